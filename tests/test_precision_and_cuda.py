"""Mixed precision (exact thresholds under autocast, on the CPU) and the CUDA paths (marked
``cuda``, skipped without a GPU): fused == naive, the bucket kernel against the reference, a
2-epoch digits run per precision, calibration."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    TINY,
    RunIf,
    bucket_case,
    check_against_eager,
    forward_backward,
    random_conv_case,
    read_summary,
    rel_err,
)

from abc_experiments.nn import ABCConv2d, ActivationBinarizer, calibrate, convert
from abc_experiments.pipeline import run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_thresholds_stay_exact_for_16_bit_inputs(dtype):
    """A 16-bit input (autocast's output) is compared with the float32 thresholds, not with
    thresholds rounded to 16 bits: the result is the float32 staircase of the same values."""
    binarizer = ActivationBinarizer(3)
    with torch.no_grad():
        binarizer.shifts.copy_(torch.tensor([0.4999, 0.2, -0.3001]))  # thresholds 1e-4, 0.3, 0.8001
    values = torch.tensor([1.0001e-4, 0.9e-4, 0.3, 0.2998, 0.8001, 0.7999, 0.0, 2.0]).to(dtype)
    out = binarizer(values)
    assert out.dtype == dtype
    assert torch.equal(out, binarizer(values.float()).to(dtype))
    rounded = binarizer.shifts.detach().to(dtype)  # what comparing in 16 bits would do
    naive = sum(torch.where(values + v >= 0.5, b, -b) for v, b in zip(rounded, binarizer.betas.detach().to(dtype)))
    assert not torch.equal(out, naive)  # the inexact comparison differs on these values


def test_abc_conv_under_autocast_keeps_float32_alphas():
    conv = ABCConv2d(4, 6, 3, padding=1, M=3, N=2)
    x = torch.rand(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and conv.weight_binarizer.alphas.dtype == torch.float32
    assert conv.weight.grad is not None and conv.activation_binarizer.shifts.grad is not None


# ---- CUDA ---------------------------------------------------------------------------------------
@RunIf(cuda=True)
@pytest.mark.parametrize("seed", range(8))
def test_fused_equals_naive_on_cuda(seed):
    torch.manual_seed(seed)
    conv, x, options = random_conv_case(seed)
    fused = ABCConv2d.from_conv(conv.cuda(), impl="fused", **options)
    naive = ABCConv2d.from_conv(conv.cuda(), impl="naive", **options)
    out_f, grads_f = forward_backward(fused, x.cuda())
    out_n, grads_n = forward_backward(naive, x.cuda())
    assert rel_err(out_f, out_n) <= 1e-4, options
    for name in grads_f:
        assert rel_err(grads_f[name], grads_n[name]) <= 1e-4, (name, options)


@RunIf(cuda=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bucket_kernel_matches_the_reference_on_cuda(dtype):
    x, shifts, betas = bucket_case(4, dtype, 3)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    check_against_eager("bucket", x.cuda(), shifts.cuda(), betas.cuda(), g.cuda())


@RunIf(cuda=True)
@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_two_epoch_digits_run_on_cuda(compose_cfg, tmp_path, precision):
    run(compose_cfg(TINY + ["device=cuda", f"precision={precision}", "pretrain.epochs=2", "finetune.epochs=2"]))
    summary = read_summary(tmp_path / "run")
    assert summary["status"] == "finished" and summary["device"].startswith("cuda")
    assert summary["precision"] == precision and summary["finetuned"]["acc"] > 50
    assert summary["images_per_s"]["finetune"] > 0


@RunIf(cuda=True)
def test_calibration_on_cuda():
    from abc_experiments.models import build_model

    model = build_model("resnet20", 3, 32, 10).cuda()
    convert(model, 3, 3)
    batches = [torch.randn(16, 3, 32, 32, device="cuda") for _ in range(2)]
    errors = calibrate(model, batches)
    assert errors and all(0 < error < 1 for error in errors.values())
