"""Activation bases and their straight-through gradients against a numpy reference, and every
staircase kernel against the eager reference (values bit for bit, gradients against float64)."""

import warnings

import numpy as np
import pytest
import torch
from helpers import RunIf, bucket_case, check_against_eager, run_kernel

from abc_experiments.cpp_build import openmp_flags
from abc_experiments.nn import (
    ActivationBinarizer,
    fit_activation_bases,
    heaviside_bases,
    staircase_dispatch,
    staircase_reference,
)
from abc_experiments.nn.staircase_bucket import bucket_supported, bucket_tables
from abc_experiments.nn.staircase_dispatch import KERNELS, _Kernels, resolve_kernel, staircase_ste
from abc_experiments.nn.staircase_reference import staircase, staircase_grad


def np_forward(r, v, beta):
    """Σₙ βₙ Hᵥₙ(R), Hᵥ(R) = +1 if clip(R + v, 0, 1) ≥ 0.5 else −1."""
    return sum(b * np.where(np.clip(r + vn, 0, 1) >= 0.5, 1.0, -1.0) for vn, b in zip(v, beta))


def np_grads(r, g, v, beta):
    """STE: the gradient passes where 0 ≤ R + vₙ ≤ 1."""
    masks = [((r + vn) >= 0) & ((r + vn) <= 1) for vn in v]
    grad_r = sum(b * g * m for b, m in zip(beta, masks))
    grad_v = [b * (g * m).sum() for b, m in zip(beta, masks)]
    grad_beta = [(g * np.where(np.clip(r + vn, 0, 1) >= 0.5, 1.0, -1.0)).sum() for vn in v]
    return grad_r, np.array(grad_v), np.array(grad_beta)


def make_input(n=4000, seed=0):
    r = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    # exact boundary cases for v = 0.25: R + v = 0, 0.5 and 1
    return torch.cat([r, torch.tensor([-0.25, 0.25, 0.75, 0.0], dtype=torch.float64)]).view(2, -1)


@pytest.mark.parametrize("chunk", [None, 1000])  # 1000: the blocked CPU kernel, over several blocks
@pytest.mark.parametrize("N", [1, 2, 3, 5])
def test_forward_and_ste_gradients_match_numpy(N, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(staircase_reference, "CHUNK", chunk)
    act = ActivationBinarizer(N).double()
    with torch.no_grad():
        act.shifts.copy_(torch.linspace(-0.5, 0.5, N) if N > 1 else torch.tensor([0.25]))
        act.betas.copy_(torch.rand(N, dtype=torch.float64) + 0.1)
    r = make_input().requires_grad_()
    g = torch.randn_like(r)
    out = act(r)
    v, beta = act.shifts.detach().numpy(), act.betas.detach().numpy()
    np.testing.assert_allclose(out.detach().numpy(), np_forward(r.detach().numpy(), v, beta), rtol=1e-12)
    (out * g).sum().backward()
    grad_r, grad_v, grad_beta = np_grads(r.detach().numpy(), g.numpy(), v, beta)
    np.testing.assert_allclose(r.grad.numpy(), grad_r, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(act.shifts.grad.numpy(), grad_v, rtol=1e-9)
    np.testing.assert_allclose(act.betas.grad.numpy(), grad_beta, rtol=1e-9)


def test_bases_are_exactly_plus_minus_one_and_initial_shifts_differ():
    for N in (2, 3, 5, 8):
        act = ActivationBinarizer(N)
        assert len(set(act.shifts.tolist())) == N
        bases = heaviside_bases(torch.rand(1000), act.shifts.detach())
        assert set(bases.unique().tolist()) <= {-1.0, 1.0}
        assert len({tuple(b.tolist()) for b in bases}) == N  # N different bases on spread data
    assert ActivationBinarizer(1).shifts.tolist() == [0.0]


@pytest.mark.slow  # torch.compile of both kernels: minutes on 2 cores
@RunIf(cpp_compiler=True)
def test_compiled_kernels_match_eager(monkeypatch):
    monkeypatch.setattr(_Kernels, "compiled", None)  # compile afresh, and leave no fallback behind
    eager, compiled = ActivationBinarizer(3), ActivationBinarizer(3, kernel="compiled")
    compiled.load_state_dict(eager.state_dict())
    r = torch.rand(4, 8, 6, 6) * 2 - 0.5
    outputs, grads = [], []
    for act in (eager, compiled):
        x = r.clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = act(x)
        out.pow(2).sum().backward()
        outputs.append(out.detach())
        grads.append((x.grad, act.shifts.grad, act.betas.grad))
    # with a C++ compiler here, torch.compile must really have run (not the eager fallback)
    assert _Kernels.compiled[0] is not staircase, [str(w.message) for w in caught]
    torch.testing.assert_close(outputs[0], outputs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_calibration_fits_real_inputs_better_than_the_default_start():
    r = torch.relu(torch.randn(50_000, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.3)
    errors = []
    for N in (1, 2, 3, 5):
        act = ActivationBinarizer(N)
        default = ((r - act(r).detach()).norm() / r.norm()).item()
        offset = act.calibrate(r)
        error = ((r - offset - act(r).detach()).norm() / r.norm()).item()
        assert act.calibration_error.item() == pytest.approx(error, abs=1e-6)
        assert error < default
        errors.append(error)
    assert errors == sorted(errors, reverse=True)
    shifts, betas, _, _ = fit_activation_bases(r, 4)
    assert len(set(shifts.tolist())) == 4 and (betas > 0).all()


def test_one_basis_on_mostly_zero_relu_inputs_still_splits_the_data():
    """Without an offset, the least-squares threshold for R >= 0 sits at 0 and every input maps to
    +beta: a constant, dead layer (seen as 10 % accuracy on MNIST at N = 1)."""
    r = torch.relu(torch.randn(20_000, generator=torch.Generator().manual_seed(2)) - 0.5)  # ~70 % zeros
    act = ActivationBinarizer(1)
    act.calibrate(r)
    bases = heaviside_bases(r, act.shifts.detach())[0]
    assert 0.05 < (bases > 0).float().mean() < 0.95
    assert act.calibration_error.item() < 0.8


@pytest.mark.parametrize("bad_N", [0, -1, 2.0, "2"])
def test_bad_N_is_a_value_error(bad_N):
    with pytest.raises(ValueError, match="N must be"):
        ActivationBinarizer(bad_N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(6))
def test_bucket_kernel_matches_the_eager_reference(dtype, seed):
    N = seed % 6 + 1
    x, shifts, betas = bucket_case(N, dtype, seed)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 100)).to(dtype)
    assert bucket_supported(x)  # the table path, not the small-input fallback
    check_against_eager("bucket", x, shifts, betas, g)  # boundaries, duplicates, ±0, ±inf included


def test_bucket_kernel_detects_a_wrong_table(monkeypatch):
    """The comparison above can fail: a table off by one bucket is caught."""
    x, shifts, betas = bucket_case(3, torch.float32, 0)
    g = torch.ones_like(x)
    tables = bucket_tables(shifts, betas, x.dtype)
    broken = dict(tables, level=torch.roll(tables["level"], 1))
    monkeypatch.setattr(staircase_dispatch, "bucket_tables", lambda *args: broken)
    assert not torch.equal(run_kernel("bucket", x, shifts, betas, g)[0], run_kernel("eager", x, shifts, betas, g)[0])


def test_bucket_kernel_with_a_threshold_exactly_at_zero():
    """v = 0.5 puts a threshold at 0, inside the bucket of −0.0: half the elements need the fix-up."""
    x = torch.relu(torch.randn(1 << 16, generator=torch.Generator().manual_seed(3)))
    x[:100] = -0.0
    shifts, betas = torch.tensor([0.5, 0.0, 0.5]), torch.tensor([0.2, 0.3, 0.1])
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    # values bit for bit; gradient sums against a float64 truth, within the rounding a sum of 65536
    # float32 terms may carry in any order (threads change the order: a fixed tolerance on the
    # difference between the two kernels failed once on CI)
    check_against_eager("bucket", x, shifts, betas, g)


def identity_compile(function, **_options):
    return function


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_named_kernel_runs_and_gives_the_reference_values(kernel, monkeypatch):
    """Each name the module and abc.kernel accept runs a kernel that computes the eager reference's
    values bit for bit (``compiled`` with torch.compile stubbed out: the slow test compiles)."""
    monkeypatch.setattr(_Kernels, "compiled", None)
    monkeypatch.setattr(staircase_dispatch.torch, "compile", identity_compile)
    x, shifts, betas = bucket_case(3, torch.float32, 5)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    check_against_eager(kernel, x, shifts, betas, g)
    act = ActivationBinarizer(3, kernel=kernel)
    with torch.no_grad():
        act.shifts.copy_(shifts)
        act.betas.copy_(betas)
    assert torch.equal(act(x.view(4, -1)).detach(), staircase(x, shifts, betas).view(4, -1))


def test_auto_is_the_default_and_unknown_kernels_are_refused():
    assert ActivationBinarizer(2).kernel == "auto"
    with pytest.raises(ValueError, match="unknown kernel 'fast': choose one of auto, native"):
        ActivationBinarizer(2, kernel="fast")
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        staircase_ste(torch.rand(4), torch.zeros(1), torch.ones(1), "fast")


def test_a_failing_torch_compile_warns_and_runs_the_eager_kernels(monkeypatch):
    def broken_compile(function, **_options):
        def fails(*args):
            raise RuntimeError("no C++ compiler (pretend)")
        return fails

    monkeypatch.setattr(_Kernels, "compiled", None)
    monkeypatch.setattr(staircase_dispatch.torch, "compile", broken_compile)
    x, shifts, betas = bucket_case(2, torch.float32, 6)
    g = torch.ones_like(x)
    with pytest.warns(UserWarning, match="torch.compile failed .*pretend.*using eager kernels"):
        check_against_eager("compiled", x, shifts, betas, g)
    assert _Kernels.compiled == (staircase, staircase_grad)


@RunIf(native_kernels=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", range(1, 7))
def test_native_kernel_matches_the_eager_reference(dtype, N):
    x, shifts, betas = bucket_case(N, dtype, N + 10)  # thresholds, window edges, duplicates, ±0, ±inf
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(N)).to(dtype)
    assert resolve_kernel("native", x, shifts, betas) == "native"
    got = check_against_eager("native", x, shifts, betas, g)
    if dtype == torch.float32:  # the reference sums grad_x in the same order: exact everywhere
        assert torch.equal(got[1], run_kernel("eager", x, shifts, betas, g)[1])


@RunIf(native_kernels=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernel_at_every_threshold_and_window_edge(dtype):
    """Every input exactly at 0.5 − v, −v and 1 − v and one float either side, the whole input (sizes
    not a multiple of the block or the lane count), a threshold at zero, NaN, and shape kept."""
    shifts = torch.tensor([0.5, 0.25, 0.5, -0.375, 0.1], dtype=dtype)
    betas = torch.tensor([0.2, 0.3, 0.1, 0.7, 0.05], dtype=dtype)
    edges = torch.cat([0.5 - shifts.float(), -shifts.float(), 1 - shifts.float()])
    up, down = (torch.nextafter(edges, torch.full_like(edges, s)) for s in (9.0, -9.0))
    x = torch.cat([edges, up, down, torch.tensor([0.0, -0.0, float("nan"), 1e30, -1e30])]).to(dtype)
    x = torch.cat([x, torch.rand(4097 * 3 - x.numel()).to(dtype)]).view(3, 4097)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = check_against_eager("native", x, shifts, betas, g)
    assert got[0].shape == x.shape and got[1].shape == x.shape
    small = x.flatten()[:7].clone()  # fewer elements than one lane group
    check_against_eager("native", small, shifts, betas, g.flatten()[:7].clone())


@RunIf(native_kernels=True)
def test_native_kernel_runs_on_torch_threads_with_the_same_results():
    x, shifts, betas = bucket_case(4, torch.float32, 7)
    x = torch.cat([x] * 8)  # 512K elements: several parallel tasks
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.ops.abc_nn.parallel_threads(64) == 1
        single = run_kernel("native", x, shifts, betas, g)
        torch.set_num_threads(max(2, threads))
        if openmp_flags():  # built for torch's OpenMP pool: parallel_for really splits the work
            assert torch.ops.abc_nn.parallel_threads(64) == max(2, threads)
        multi = run_kernel("native", x, shifts, betas, g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], multi[0]) and torch.equal(single[1], multi[1])
    for a, b in zip(single[2:], multi[2:]):  # per-block partial sums, reduced in block order: exact too
        assert torch.equal(a, b), (a, b)


@RunIf(native_kernels=True)
def test_auto_resolves_to_native_on_the_cpu_and_to_bucket_elsewhere():
    x, shifts, betas = torch.rand(64), torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])
    assert resolve_kernel("auto", x, shifts, betas) == "native"
    assert resolve_kernel("auto", x.double(), shifts.double(), betas.double()) == "bucket"
    assert resolve_kernel("auto", torch.rand(8, 8).t(), shifts, betas) == "bucket"  # not contiguous
    assert resolve_kernel("bucket", x, shifts, betas) == "bucket"
    act = ActivationBinarizer(2)
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    act(x).sum().backward()  # through the module with the default kernel
    assert x.grad is not None and act.shifts.grad is not None


def test_native_unavailable_falls_back_to_bucket(monkeypatch):
    monkeypatch.setattr(staircase_dispatch, "native_available", lambda: False)
    x, shifts, betas = bucket_case(3, torch.float32, 1)
    assert resolve_kernel("auto", x, shifts, betas) == "bucket"
    assert resolve_kernel("native", x, shifts, betas) == "bucket"
    g = torch.ones_like(x)
    assert torch.equal(run_kernel("auto", x, shifts, betas, g)[0], run_kernel("eager", x, shifts, betas, g)[0])


def test_a_failed_native_build_warns_once_and_auto_uses_bucket(monkeypatch):
    from abc_experiments.nn import native

    def broken_build():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(native, "_state", {"loaded": None, "error": None})
    monkeypatch.setattr(native, "_load", broken_build)
    with pytest.warns(native.NativeKernelWarning, match="install a C\\+\\+ compiler .* ninja") as record:
        assert not native.native_available()
        assert not native.native_available()  # remembered: no second build, no second warning
    assert len(record) == 1 and "Ninja is required" in str(record[0].message)
    assert isinstance(native.native_error(), RuntimeError)
    x, shifts, betas = torch.rand(100), torch.tensor([0.1]), torch.tensor([0.5])
    assert resolve_kernel("auto", x, shifts, betas) == "bucket"
