"""Microkernel tester of the packed engine, in the spirit of XNNPACK's: sweeps the tile edges of
the register blocking (output channels around multiples of 8, positions around the tile widths,
reduction words around multiples of 64 channels, 1-5 activation planes, 1 or 3 weight bases,
counters that spill) and checks that every native path this machine runs (AVX-512 under emulation
included) gives the portable C++ path's output bit for bit. Their integer counts are exact and all
paths share one epilogue order (fused multiply-add per basis pair, then bias term, residual,
ReLU), so any difference is a bug in a path's blocking. The float64 check of the numbers
themselves is in test_packed.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import RunIf
from torch import nn

from abc_experiments import packed as P
from abc_experiments.nn import convert

NATIVE = [pytest.param(isa, marks=RunIf(packed_isa=isa), id=isa) for isa in ("avx512", "avx512_emulated", "avx2")]
OUT_CHANNELS = (1, 7, 8, 9, 17)  # tiles hold blocks of 8 output channels
WIDTHS = (1, 4, 5, 9, 18)  # register tiles hold 1, 2, 4 or 8 positions (18: interior tiles of 8)
IN_CHANNELS = (1, 65, 130)  # 64 channels per word
PLANES = ((1, 1), (3, 2), (1, 3), (3, 5))  # (M, N)


def converted(layer: nn.Module, M: int, N: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(layer)
    convert(net, M, N, keep_first=False, keep_last=False, linear=True)
    with torch.no_grad():
        net[0].activation_binarizer.shifts.uniform_(-0.3, 0.3)  # planes that differ
        net[0].activation_binarizer.betas.uniform_(0.2, 1.0)
    return P.pack_model(net.eval())


def outputs(packed: nn.Module, x: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        with P.use_isa("portable"):
            expected = packed(x)
        with P.use_isa(isa):
            return packed(x), expected


@RunIf(packed_isa="portable")
@pytest.mark.parametrize("isa", NATIVE)
def test_conv_tile_edges_bit_for_bit(isa):
    failures = []
    cases = itertools.product(OUT_CHANNELS, IN_CHANNELS, WIDTHS, PLANES)
    for index, (cout, cin, width, (M, N)) in enumerate(cases):
        stride = 2 if index % 7 == 0 else 1
        packed = converted(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), M, N, seed=index)
        x = torch.rand(2, cin, 3, width)
        got, expected = outputs(packed, x, isa)
        if not torch.equal(got, expected):
            failures.append((cout, cin, width, M, N, stride, (got - expected).abs().max().item()))
    assert not failures, f"{len(failures)} cases differ from the portable path, e.g. {failures[:3]}"


@RunIf(packed_isa="portable")
@pytest.mark.parametrize("isa", NATIVE)
def test_channels_last_tile_edges_bit_for_bit(isa):
    """The conv operator on channels_last inputs (how a chain runs): its output is channels_last
    and, with the border term in either layout, a residual and the ReLU, the NCHW portable output
    bit for bit (the channels-contiguous store and the NHWC packing against the transposing ones)."""
    failures = []
    cases = itertools.product(OUT_CHANNELS, IN_CHANNELS, WIDTHS, PLANES)
    for index, (cout, cin, width, (M, N)) in enumerate(cases):
        stride = 2 if index % 7 == 0 else 1
        packed = converted(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), M, N, seed=index)[0]
        x = torch.rand(2, cin, 3, width)
        op, args = packed._operator_args(3, width, isa)
        bterm = args[2]
        residual = torch.randn(2, cout, *bterm.shape[1:]) if index % 3 == 0 else None
        relu = index % 2 == 0
        with P.use_isa("portable"):
            op_portable, args_portable = packed._operator_args(3, width, "portable")
            expected = op_portable(x, *args_portable, relu, residual)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        r_cl = None if residual is None else residual.contiguous(memory_format=torch.channels_last)
        for layout in (bterm, bterm.permute(1, 2, 0).contiguous().permute(2, 0, 1)):
            got = op(x_cl, *args[:2], layout, *args[3:], relu, r_cl)
            # (an input dense in both orders, 1 channel or a 1x1 map, may give either, like F.conv2d)
            dense = x_cl.is_contiguous() or got.is_contiguous(memory_format=torch.channels_last)
            if not (dense and torch.equal(got, expected)):
                failures.append((cout, cin, width, M, N, stride, layout.stride(), dense))
    assert not failures, f"{len(failures)} cases differ from the portable NCHW path, e.g. {failures[:3]}"


@RunIf(packed_isa="portable")
@pytest.mark.parametrize("isa", NATIVE)
def test_linear_tile_edges_bit_for_bit(isa):
    failures = []
    for index, (out, features, (M, N)) in enumerate(itertools.product(OUT_CHANNELS, (1, 63, 64, 65, 129), PLANES)):
        packed = converted(nn.Linear(features, out), M, N, seed=index)
        got, expected = outputs(packed, torch.rand(3, features), isa)
        if not torch.equal(got, expected):
            failures.append((out, features, M, N, (got - expected).abs().max().item()))
    assert not failures, f"{len(failures)} cases differ from the portable path, e.g. {failures[:3]}"


@RunIf(packed_isa="portable")
@pytest.mark.parametrize("isa", NATIVE)
def test_counters_that_spill_bit_for_bit(isa):
    """4,100 channels x 9 taps: 585 word steps per position, past the 8-bit counters' span."""
    packed = converted(nn.Conv2d(4100, 9, 3, padding=1), 1, 2, seed=0)
    got, expected = outputs(packed, torch.rand(1, 4100, 2, 5), isa)
    assert torch.equal(got, expected)
