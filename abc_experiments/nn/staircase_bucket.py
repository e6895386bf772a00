"""The "bucket" kernel of the activation staircase: one table lookup per element, whatever N.

Every output of the staircase (its value, its STE slope ∂/∂x, and which thresholds and windows an
element is on the far side of) depends on x only through the predicates fl(x + vₙ) ≥ 0.5,
fl(x + vₙ) ≥ 0 and fl(x + vₙ) ≤ 1, computed exactly as the eager reference
(:mod:`.staircase_reference`) computes them. Each is monotone in x (rounding is monotone). The kernel
cuts the line of floats into 65,536 buckets by the top 16 bits of their bit pattern (for
bfloat16/float16 every value is its own bucket); each bucket is an interval of values (of one sign).
A monotone predicate that agrees on a bucket's two end values is constant on the whole bucket, so
the tables below, built by running the *reference* ops on the bucket ends, give bit-identical
results for every element of such a bucket. A float32 bucket where some predicate flips (a threshold
or STE window edge lies strictly inside it, at most 3N of the 65,536) is marked NaN in the tables,
and its few elements are recomputed with the reference kernels. Cost per element: forward = bucket
id + one gather (+ the fix-up of marked buckets); backward = bucket id + one gather of the slope +
one multiply + one ``bincount`` of the upstream gradient per bucket; shift and beta gradients are
then (65,536 × N) table products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .staircase_reference import staircase, staircase_blocked, staircase_grad, staircase_grad_blocked

BUCKETS = 1 << 16
BUCKET_MIN_NUMEL = 1 << 15  # smaller activations (and float64) run the eager reference: cheaper there
_bucket_ends_cache: dict = {}


def bucket_supported(x: Tensor) -> bool:
    """Whether the tables serve ``x``; other inputs run the blocked eager reference.

    Args:
        x: the staircase input.

    Returns:
        True for float32, bfloat16 and float16 inputs of at least ``BUCKET_MIN_NUMEL`` elements.
    """
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.numel() >= BUCKET_MIN_NUMEL


def bucket_ids(x: Tensor) -> Tensor:
    """The bucket of every element, from the top 16 bits of its bit pattern (all of them for
    16-bit dtypes).

    Args:
        x: a float32, bfloat16 or float16 tensor.

    Returns:
        int32 bucket ids in 0..65535, one per element of ``x`` flattened.
    """
    flat = x.contiguous().view(-1)
    if x.element_size() == 4:  # top 16 bits, sign included, shifted to 0..65535: bucket u ^ 0x8000
        return (flat.view(torch.int32) >> 16).add_(1 << 15)  # (faster than a strided uint16 copy)
    return flat.view(torch.uint16).to(torch.int32)


def bucket_ends(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The first and the last bit pattern of every bucket, as values. Cached per dtype and device.

    Args:
        dtype: float32, bfloat16 or float16.
        device: where the tables live.

    Returns:
        (2, 65536) tensor of ``dtype`` (the same value twice for 16-bit dtypes).
    """
    key = (dtype, str(device))
    if key not in _bucket_ends_cache:
        ids = torch.arange(BUCKETS, dtype=torch.int64, device=device)
        if dtype in (torch.bfloat16, torch.float16):
            bits = torch.where(ids >= 1 << 15, ids - (1 << 16), ids).to(torch.int16)
            ends = torch.stack([bits, bits]).view(dtype)
        else:
            first = (ids ^ (1 << 15)) << 16  # the order of bucket_ids: top 16 bits ^ 0x8000
            last = first | 0xFFFF
            bits = torch.stack([first, last])
            ends = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
        _bucket_ends_cache[key] = ends
    return _bucket_ends_cache[key]


def bucket_tables(shifts: Tensor, betas: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """Per-bucket tables for the current shifts and betas.

    Args:
        shifts: (N,) shifts vₙ, already in ``dtype``.
        betas: (N,) scales βₙ, already in ``dtype``.
        dtype: the dtype of the inputs the tables serve.

    Returns:
        ``region`` (65536, N) uint8: where x + vₙ lies for the bucket's values, 0: below 0 (or
        NaN), 1: in [0, 0.5), 2: in [0.5, 1], 3: above 1, read at the bucket's first value;
        ``marked`` (65536,) bool: the buckets where some region changes between the bucket's two
        ends; ``level`` (forward value, NaN on marked buckets) and ``slope`` (Σ βₙ over the STE
        windows holding the bucket).
    """
    ends = bucket_ends(dtype, shifts.device)  # (2, B)
    y = ends.unsqueeze(-1) + shifts  # (2, B, N): x + vₙ exactly as the reference rounds it
    region = (y >= 0).to(torch.uint8).add_(y >= 0.5).add_(y > 1)
    marked = (region[0] != region[1]).any(-1)
    region = region[0]
    up = region >= 2
    level = None
    for n in range(shifts.numel()):  # the reference's terms, summed in its order
        term = torch.where(up[:, n], betas[n], -betas[n])
        level = term if level is None else level + term
    active = (region - 1) <= 1  # uint8 wraps 0 to 255
    slope = (active.to(betas.dtype) * betas).sum(-1)
    level = level.masked_fill(marked, float("nan"))
    return dict(region=region, marked=marked, level=level, slope=slope)


def staircase_bucket(x: Tensor, shifts: Tensor, betas: Tensor, tables: dict | None = None,
                     fixed: list | None = None) -> Tensor:
    """:func:`~.staircase_reference.staircase` by one table lookup per element (bit-identical values).

    Args:
        x: the input, any shape (inputs :func:`bucket_supported` refuses run the blocked reference).
        shifts: (N,) shifts vₙ, in ``x``'s dtype.
        betas: (N,) scales βₙ, in ``x``'s dtype.
        tables: :func:`bucket_tables` for these shifts and betas, if already built.
        fixed: if given, receives the flat indices of the elements recomputed by the reference.

    Returns:
        The staircase values, ``x``'s shape and dtype.
    """
    if not bucket_supported(x):
        return staircase_blocked(x, shifts, betas)
    tables = tables or bucket_tables(shifts, betas, x.dtype)
    out = tables["level"].index_select(0, bucket_ids(x))
    fix = out.isnan().nonzero().squeeze(1)  # elements of marked buckets (and NaN levels)
    if fix.numel():
        out[fix] = staircase(x.contiguous().view(-1)[fix], shifts, betas)
    if fixed is not None:
        fixed.append(fix)
    return out.view(x.shape)


def staircase_grad_bucket(x: Tensor, grad: Tensor, shifts: Tensor, betas: Tensor, tables: dict | None = None,
                          fix: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`~.staircase_reference.staircase_grad` from bucket sums: grad to x = grad × slope of
    its bucket; shift and beta gradients from one ``bincount`` of the upstream gradient per bucket.

    Args:
        x: the forward input.
        grad: the upstream gradient, ``x``'s shape.
        shifts: (N,) shifts vₙ, in ``x``'s dtype.
        betas: (N,) scales βₙ, in ``x``'s dtype.
        tables: :func:`bucket_tables` for these shifts and betas, if already built.
        fix: the flat indices of the elements in marked buckets, if the forward found them.

    Returns:
        (grad_x, grad_shifts, grad_betas) in the dtypes of ``x``, ``shifts`` and ``betas``; the
        per-bucket sums are combined with the tables in float64.
    """
    if not bucket_supported(x):
        return staircase_grad_blocked(x, grad, shifts, betas)
    tables = tables or bucket_tables(shifts, betas, x.dtype)
    ids = bucket_ids(x)
    flat_grad = grad.contiguous().view(-1)
    grad_x = flat_grad * tables["slope"].index_select(0, ids)
    weights = flat_grad if flat_grad.dtype == torch.float32 else flat_grad.double()
    sums = torch.bincount(ids, weights=weights, minlength=BUCKETS)
    hit = (sums != 0).logical_and_(~tables["marked"]).nonzero().squeeze(1)  # buckets to count
    region, hit_sums = tables["region"][hit], sums[hit].double()
    grad_betas = hit_sums @ torch.where(region >= 2, 1.0, -1.0).double()
    grad_shifts = betas.double() * (hit_sums @ ((region - 1) <= 1).double())
    if fix is None:
        fix = tables["level"].index_select(0, ids).isnan().nonzero().squeeze(1)
    if fix.numel():
        fix_x, fix_shifts, fix_betas = staircase_grad(x.contiguous().view(-1)[fix], flat_grad[fix], shifts, betas)
        grad_x[fix] = fix_x
        grad_shifts += fix_shifts.double()
        grad_betas += fix_betas.double()
    return grad_x.view(x.shape), grad_shifts.to(shifts.dtype), grad_betas.to(betas.dtype)
