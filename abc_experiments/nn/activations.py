"""Binary activation bases (ABC-Net, Lin, Zhao & Pan, NIPS 2017, arXiv 1711.11294, Section 3.2).

Activations R are approximated by N binary tensors with trainable shifts vₙ and scales βₙ::

    A ≈ Σₙ βₙ H_{vₙ}(R),     H_v(R) = +1 if clip(R + v, 0, 1) ≥ 0.5 else −1       (eq. 6–7)

Straight-through estimator (eq. 8): H is treated as clip(R + v, 0, 1), so the gradient passes to R and
to vₙ where 0 ≤ R + vₙ ≤ 1 (slope 1) and is zero elsewhere; ∂c/∂βₙ = Σ ∂c/∂A · H_{vₙ}(R) exactly.

The N initial shifts differ from each other (the seed notebook started them all at 0, which makes the
N bases identical): thresholds 0.5 − vₙ are spread evenly over (0, 1). :func:`fit_activation_bases`
fits shifts and betas to real inputs (used by calibration).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor, nn

from .native import native_available
from .weights import check_count, is_exporting

log = logging.getLogger(__name__)
KERNELS = ("auto", "native", "bucket", "eager", "compiled")


def heaviside_bases(x: Tensor, shifts: Tensor) -> Tensor:
    """H_{vₙ}(x) for every shift, stacked to (N, *x.shape), values ±1 (no gradient)."""
    view = (-1,) + (1,) * x.dim()
    return torch.where(x.unsqueeze(0) + shifts.view(view) >= 0.5, 1.0, -1.0).to(x.dtype)


def staircase(x: Tensor, shifts: Tensor, betas: Tensor) -> Tensor:
    """Σₙ βₙ H_{vₙ}(x), one term at a time (memory stays at one activation-sized buffer)."""
    out = None
    for v, b in zip(shifts.unbind(), betas.unbind()):
        term = torch.where(x + v >= 0.5, b, -b)
        out = term if out is None else out + term
    return out


def staircase_grad(x: Tensor, grad: Tensor, shifts: Tensor, betas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """STE gradients of :func:`staircase` w.r.t. x, the shifts and the betas."""
    grad_x = torch.zeros_like(x)
    grad_shifts, grad_betas = [], []
    for v, b in zip(shifts.unbind(), betas.unbind()):
        y = x + v
        passed = torch.where((y >= 0) & (y <= 1), grad, 0.0)
        grad_x = grad_x + b * passed
        grad_shifts.append(b * passed.sum())
        grad_betas.append(torch.where(y >= 0.5, grad, -grad).sum())
    return grad_x, torch.stack(grad_shifts), torch.stack(grad_betas)


CHUNK = 1 << 18  # elements per block of the eager CPU kernels: 1 MiB of float32 stays in cache


def _blocks(*tensors: Tensor):
    """Flat contiguous views of ``tensors`` cut into matching blocks of CHUNK elements."""
    flat = [t.contiguous().view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CHUNK):
        yield [t[start:start + CHUNK] for t in flat]


def staircase_blocked(x: Tensor, shifts: Tensor, betas: Tensor) -> Tensor:
    """:func:`staircase` one cache-sized block at a time on the CPU, where the N passes over a
    large activation are bound by memory bandwidth (about 2x faster; the same values)."""
    if x.device.type != "cpu" or x.numel() <= CHUNK:
        return staircase(x, shifts, betas)
    out = torch.empty(x.shape, dtype=x.dtype)
    for x_block, out_block in _blocks(x, out):
        out_block.copy_(staircase(x_block, shifts, betas))
    return out


def staircase_grad_blocked(x: Tensor, grad: Tensor, shifts: Tensor, betas: Tensor):
    """:func:`staircase_grad` block by block on the CPU (see :func:`staircase_blocked`)."""
    if x.device.type != "cpu" or x.numel() <= CHUNK:
        return staircase_grad(x, grad, shifts, betas)
    grad_x = torch.empty(x.shape, dtype=x.dtype)
    grad_shifts, grad_betas = torch.zeros_like(shifts), torch.zeros_like(betas)
    for x_block, grad_block, out_block in _blocks(x, grad, grad_x):
        block_x, block_shifts, block_betas = staircase_grad(x_block, grad_block, shifts, betas)
        out_block.copy_(block_x)
        grad_shifts += block_shifts
        grad_betas += block_betas
    return grad_x, grad_shifts, grad_betas


# ---------------------------------------------------------------------------------------------------
# The "bucket" kernel: one table lookup per element, whatever N.
#
# Every output of the staircase (its value, its STE slope ∂/∂x, and which thresholds and windows an
# element is on the far side of) depends on x only through the predicates fl(x + vₙ) ≥ 0.5,
# fl(x + vₙ) ≥ 0 and fl(x + vₙ) ≤ 1, computed exactly as the eager reference computes them. Each is
# monotone in x (rounding is monotone). The kernel cuts the line of floats into 65,536 buckets by the
# top 16 bits of their bit pattern (for bfloat16/float16 every value is its own bucket); each bucket
# is an interval of values (of one sign). A monotone predicate that agrees on a bucket's two end
# values is constant on the whole bucket, so the tables below, built by running the *reference*
# ops on the bucket ends, give bit-identical results for every element of such a bucket. A float32
# bucket where some predicate flips (a threshold or STE window edge lies strictly inside it, at most
# 3N of the 65,536) is marked NaN in the tables, and its few elements are recomputed with the
# reference kernels. Cost per element: forward = bucket id + one gather (+ the fix-up of marked
# buckets); backward = bucket id + one gather of the slope + one multiply + one ``bincount`` of the
# upstream gradient per bucket; shift and beta gradients are then (65,536 × N) table products.
# ---------------------------------------------------------------------------------------------------

BUCKETS = 1 << 16
BUCKET_MIN_NUMEL = 1 << 15  # smaller activations (and float64) run the eager reference: cheaper there
_bucket_ends_cache: dict = {}


def _lut_supported(x: Tensor) -> bool:
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.numel() >= BUCKET_MIN_NUMEL


def bucket_ids(x: Tensor) -> Tensor:
    """int32 bucket (0..65535) of every element of ``x`` (flattened), from the top 16 bits of
    its bit pattern (all of them for 16-bit dtypes)."""
    flat = x.contiguous().view(-1)
    if x.element_size() == 4:  # top 16 bits, sign included, shifted to 0..65535: bucket u ^ 0x8000
        return (flat.view(torch.int32) >> 16).add_(1 << 15)  # (faster than a strided uint16 copy)
    return flat.view(torch.uint16).to(torch.int32)


def bucket_ends(dtype: torch.dtype, device: torch.device) -> Tensor:
    """(2, 65536): the first and the last bit pattern of every bucket, as values of ``dtype``
    (the same value twice for 16-bit dtypes). Cached per dtype and device."""
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
    """Per-bucket tables for the current shifts and betas (already in ``dtype``).

    ``region`` (65536, N) uint8: where x + vₙ lies for the bucket's values, 0: below 0 (or NaN),
    1: in [0, 0.5), 2: in [0.5, 1], 3: above 1, read at the bucket's first value; ``marked``: the
    buckets where some region changes between the bucket's two ends; ``level`` (forward value,
    NaN on marked buckets) and ``slope`` (Σ βₙ over the STE windows holding the bucket).
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
    """:func:`staircase` by one table lookup per element (bit-identical values). ``fixed``, if
    given, receives the flat indices of the elements recomputed by the reference."""
    if not _lut_supported(x):
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
                          fix: Tensor | None = None):
    """:func:`staircase_grad` from bucket sums: grad to x = grad × slope of its bucket; shift and
    beta gradients from one ``bincount`` of the upstream gradient per bucket. ``fix``: the flat
    indices of the elements in marked buckets, if the forward found them."""
    if not _lut_supported(x):
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


# ---------------------------------------------------------------------------------------------------
# The "native" kernel: one pass over x forward and one backward in C++ (csrc/staircase.cpp), values
# bit-identical to the reference, shift and beta gradients summed in double. CPU float32/bfloat16
# contiguous inputs only; anything else runs "bucket". "auto": native where it is built, else bucket.
# ---------------------------------------------------------------------------------------------------


def _native_supported(x: Tensor, shifts: Tensor, betas: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
            and shifts.dtype == x.dtype and betas.dtype == x.dtype and shifts.device.type == "cpu"
            and betas.device.type == "cpu")


def resolve_kernel(kernel: str, x: Tensor, shifts: Tensor, betas: Tensor) -> str:
    """The kernel that actually runs for ``kernel`` on these tensors (``auto``/``native`` fall back
    to ``bucket`` where the native kernel does not apply or could not be built)."""
    if kernel in ("auto", "native"):
        return "native" if _native_supported(x, shifts, betas) and native_available() else "bucket"
    return kernel


def staircase_native(x: Tensor, shifts: Tensor, betas: Tensor) -> Tensor:
    """:func:`staircase` in one C++ pass (bit-identical values)."""
    return torch.ops.abc_nn.staircase_forward(x, shifts, betas)


def staircase_grad_native(x: Tensor, grad: Tensor, shifts: Tensor, betas: Tensor):
    """:func:`staircase_grad` in one C++ pass (sums over x in double)."""
    return torch.ops.abc_nn.staircase_backward(x, grad, shifts, betas)


class _Kernels:
    """The forward and backward functions: ``bucket`` (table lookups), ``eager`` (the
    reference: N passes) or ``compiled`` (the reference through ``torch.compile``: fused into one
    pass each; the first call compiles, ~30 s)."""

    compiled: tuple | None = None

    @classmethod
    def get(cls, kernel: str):
        if kernel == "bucket":
            return staircase_bucket, staircase_grad_bucket
        if kernel == "eager":
            return staircase_blocked, staircase_grad_blocked
        if cls.compiled is None:
            cls.compiled = (torch.compile(staircase, dynamic=True), torch.compile(staircase_grad, dynamic=True))
        return cls.compiled

    @classmethod
    def fall_back(cls, error: Exception):
        warnings.warn(f"torch.compile failed for the ABC activation kernels ({error}); using eager kernels")
        cls.compiled = (staircase, staircase_grad)


class _StaircaseSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shifts, betas, kernel):
        kernel = resolve_kernel(kernel, x, shifts, betas)
        if kernel == "native":
            ctx.save_for_backward(x, shifts, betas)
            ctx.tables, ctx.backward_kernel = None, staircase_grad_native
            return staircase_native(x, shifts, betas)
        if kernel == "bucket":
            tables = bucket_tables(shifts, betas, x.dtype) if _lut_supported(x) else None
            fixed = []
            out = staircase_bucket(x, shifts, betas, tables, fixed)
            ctx.save_for_backward(x, shifts, betas, *fixed)
            ctx.tables, ctx.backward_kernel = tables, staircase_grad_bucket
            return out
        forward, backward = _Kernels.get(kernel)
        try:
            out = forward(x, shifts, betas)
        except Exception as error:  # a missing compiler shows up only on the first call
            if kernel == "eager":
                raise
            _Kernels.fall_back(error)
            forward, backward = _Kernels.get(kernel)
            out = forward(x, shifts, betas)
        ctx.save_for_backward(x, shifts, betas)
        ctx.tables = None
        ctx.backward_kernel = backward
        return out

    @staticmethod
    def backward(ctx, grad):
        x, shifts, betas, *fixed = ctx.saved_tensors
        if ctx.tables is not None:
            grad_x, grad_shifts, grad_betas = staircase_grad_bucket(x, grad, shifts, betas, ctx.tables, *fixed)
        else:
            grad_x, grad_shifts, grad_betas = ctx.backward_kernel(x, grad.contiguous(), shifts, betas)
        return grad_x, grad_shifts, grad_betas, None


def default_shifts(N: int) -> Tensor:
    """Distinct initial shifts: thresholds 0.5 − vₙ at n/(N + 1), n = 1..N (v = 0 for N = 1)."""
    return 0.5 - torch.arange(1, N + 1, dtype=torch.float32) / (N + 1)


class ActivationBinarizer(nn.Module):
    """R ↦ Σₙ βₙ H_{vₙ}(R) with trainable shifts v and betas β and the STE of eq. 8.

    ``kernel`` picks how: ``"auto"`` (default: ``"native"`` where the C++ kernels could be built,
    else ``"bucket"``), ``"native"`` (one C++ pass over x forward and one backward, CPU float32 and
    bfloat16; values bit-identical to the reference; other inputs run ``"bucket"``), ``"bucket"``
    (one table lookup per element forward, one lookup and one per-bucket sum backward, cost
    independent of N, values bit-identical to the reference),
    ``"eager"`` (the reference, N passes), ``"compiled"`` (the reference through ``torch.compile``;
    falls back to eager with a warning where compilation is unavailable). While the model is being
    exported or traced (``torch.export``, ``torch.onnx``, ``torch.jit``) the forward is the
    reference's plain ops, values only (no STE).
    """

    def __init__(self, N: int, kernel: str = "auto"):
        super().__init__()
        self.N = check_count("N", N, 1)
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self.shifts = nn.Parameter(default_shifts(N))
        self.betas = nn.Parameter(torch.full((N,), 1.0 / (2 * N)))
        # Relative error ‖R − ΣβA‖/‖R‖ measured by the last calibration (NaN until calibrated).
        self.register_buffer("calibration_error", torch.tensor(float("nan")))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and self.shifts.dtype == torch.float32:
            # Under autocast the input arrives in 16 bits: compare it with the float32 thresholds
            # (float32 holds every 16-bit value exactly) so that no threshold is rounded.
            return self.forward(x.float()).to(x.dtype)
        shifts, betas = self.shifts, self.betas
        if shifts.dtype != x.dtype:  # (a no-op cast would still be a node in an exported graph)
            shifts, betas = shifts.to(x.dtype), betas.to(x.dtype)
        if is_exporting():
            return staircase(x, shifts, betas)  # portable ops for torch.export / ONNX / TorchScript
        return _StaircaseSTE.apply(x, shifts, betas, self.kernel)

    def bases_with_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(Aₙ stacked (N, *x.shape), betas); each Aₙ carries its own STE gradient (naive path)."""
        shifted = x.unsqueeze(0) + self.shifts.view((-1,) + (1,) * x.dim())
        passed = ((shifted >= 0) & (shifted <= 1)).to(x.dtype)
        bases = heaviside_bases(x.detach(), self.shifts.detach())
        return bases + passed * (shifted - shifted.detach()), self.betas

    @torch.no_grad()
    def calibrate(self, samples: Tensor, iterations: int = 25) -> float:
        """Fit shifts and betas to a sample of this layer's real inputs (see
        :func:`fit_activation_bases`); return the input offset c the layer must absorb."""
        shifts, betas, offset, error = fit_activation_bases(samples, self.N, iterations)
        self.shifts.copy_(shifts)
        self.betas.copy_(betas)
        self.calibration_error.fill_(error)
        return offset

    def extra_repr(self) -> str:
        return f"N={self.N}, kernel={self.kernel}"


def _least_squares_fit(samples: Tensor, shifts: Tensor) -> tuple[Tensor, Tensor]:
    """(offset c, betas) minimising ‖R − c − Σₙ βₙ H_{vₙ}(R)‖² for fixed shifts."""
    bases = heaviside_bases(samples, shifts).to(torch.float64)  # (N, n)
    design = torch.cat([torch.ones_like(bases[:1]), bases])  # constant column first
    gram = design @ design.t()
    rhs = design @ samples.to(torch.float64)
    solution = (torch.linalg.pinv(gram, hermitian=True, rtol=1e-10) @ rhs).to(samples.dtype)
    return solution[0], solution[1:]


def fit_activation_bases(samples: Tensor, N: int, iterations: int = 25) -> tuple[Tensor, Tensor, float, float]:
    """Shifts, betas and an input offset c minimising ‖R − c − Σₙ βₙ H_{vₙ}(R)‖² on ``samples``.

    Σₙ βₙHₙ alone has levels symmetric about 0 (±Σβ at the extremes), so for non-negative inputs
    such as ReLU outputs the best fit without an offset puts every threshold at 0 and maps all of R
    to +Σβ (at N = 1: a constant, a dead layer). With the offset the model is any staircase with N
    thresholds, and Lloyd–Max alternation applies: N + 1 levels start evenly spaced between the 1st
    and 99th percentile of R, thresholds at their midpoints; then repeatedly c and the betas are the
    least-squares fit for the current thresholds and each threshold moves to the midpoint of the two
    levels it separates. The error never increases; the best iterate is kept. The offset is not part
    of the layer: calibration folds c·ΣŴ into the layer's bias (a constant input shift is a constant
    output shift of a linear layer). Returns (shifts vₙ = 0.5 − thresholdₙ, betas, c, relative error
    ‖R − c − ΣβA‖ / ‖R‖).
    """
    check_count("N", N, 1)
    samples = samples.detach().flatten().float().cpu()
    norm = samples.norm().item() or 1.0
    low, high = torch.quantile(samples.double()[: 1 << 24], torch.tensor([0.01, 0.99], dtype=torch.float64)).tolist()
    if high <= low:
        low, high = samples.min().item(), samples.max().item() + 1e-6
    levels = torch.linspace(low, high, N + 1)
    thresholds = (levels[:-1] + levels[1:]) / 2
    best = None
    for _ in range(iterations):
        shifts = 0.5 - thresholds
        offset, betas = _least_squares_fit(samples, shifts)
        approx = offset + (betas.view(-1, 1) * heaviside_bases(samples, shifts)).sum(0)
        error = (samples - approx).norm().item() / norm
        if best is not None and error >= best[3] * (1 - 1e-4):  # converged (or no better)
            if error < best[3]:
                best = (shifts.clone(), betas.clone(), offset.item(), error)
            break
        best = (shifts.clone(), betas.clone(), offset.item(), error)
        # Levels in threshold order: L₀ = c − Σβ, Lₖ = Lₖ₋₁ + 2β₍ₖ₎; thresholds move to the midpoints.
        order = torch.argsort(thresholds)
        steps = 2 * betas[order].clamp_min(1e-8)
        start = offset - betas.sum()
        levels = torch.cat([start.view(1), start + torch.cumsum(steps, 0)])
        thresholds = torch.empty_like(thresholds).scatter_(0, order, (levels[:-1] + levels[1:]) / 2)
    return best
