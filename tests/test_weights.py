"""Weight bases and alphas against a numpy reference written from the paper's equations."""

import numpy as np
import pytest
import torch

from abc_experiments.nn import (
    WeightBinarizer,
    alternating_bases,
    fit_alphas,
    fit_alphas_adam,
    nearest_code_bases,
    residual_bases,
    weight_bases,
)
from abc_experiments.nn.weights import combine


def np_bases(w, M, scope):
    """Bₘ = sign(W − mean + uₘ·std), sign(0) = +1, uₘ = −1 + 2(m−1)/(M−1)."""
    u = np.zeros(1) if M == 1 else -1 + 2 * np.arange(M) / (M - 1)
    if scope == "per_layer":
        mean, std = w.mean(), w.std()
    else:
        axes = tuple(range(1, w.ndim))
        mean, std = w.mean(axis=axes, keepdims=True), w.std(axis=axes, keepdims=True)
    return np.stack([np.where(w - mean + um * std >= 0, 1.0, -1.0) for um in u])


def np_alphas(w, bases, scope):
    M = bases.shape[0]
    if scope == "per_layer":
        return np.linalg.lstsq(bases.reshape(M, -1).T, w.reshape(-1), rcond=None)[0]
    return np.stack([np.linalg.lstsq(bases[:, c].reshape(M, -1).T, w[c].reshape(-1), rcond=None)[0]
                     for c in range(w.shape[0])], axis=1)


SHAPES = [(16, 8, 3, 3), (4, 3, 5, 5), (10, 20), (6, 1, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("M", [1, 2, 3, 5])
@pytest.mark.parametrize("scope", ["per_layer", "per_channel"])
def test_bases_and_alphas_match_numpy(shape, M, scope):
    w = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(M))
    bases = weight_bases(w, M, scope)
    expected = np_bases(w.numpy(), M, scope)
    assert bases.shape == (M, *shape)
    np.testing.assert_array_equal(bases.numpy(), expected)
    alphas = fit_alphas(w, bases, scope)
    assert alphas.shape == ((M,) if scope == "per_layer" else (M, shape[0]))
    np.testing.assert_allclose(alphas.numpy(), np_alphas(w.numpy(), expected, scope), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("scope", ["per_layer", "per_channel"])
def test_residual_is_orthogonal_to_every_basis(scope):
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    bases = weight_bases(w, 4, scope)
    residual = w - combine(fit_alphas(w, bases, scope), bases)
    if scope == "per_layer":
        products = (bases * residual).flatten(1).sum(1)
    else:
        products = (bases * residual).flatten(2).sum(2)
    assert products.abs().max() < 1e-9


def test_sign_of_zero_is_plus_one():
    w = torch.tensor([[-1.0, 0.0, 1.0]])  # mean 0, so B = sign(W) must hold +1 at the zero
    bases = weight_bases(w, 1)
    assert bases.tolist() == [[[-1.0, 1.0, 1.0]]]
    assert set(weight_bases(torch.randn(50, 7), 6).unique().tolist()) == {-1.0, 1.0}


def test_coinciding_bases_give_finite_least_squares_alphas():
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0]])  # two distinct values: all 5 bases coincide pairwise
    bases = weight_bases(w, 5)
    alphas = fit_alphas(w, bases)
    assert torch.isfinite(alphas).all()
    assert torch.allclose(combine(alphas, bases), w, atol=1e-6)


def test_closed_form_is_no_worse_than_the_notebook_adam_fit():
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    bases = weight_bases(w, 3)
    closed = (w - combine(fit_alphas(w, bases), bases)).norm()
    adam = (w - combine(fit_alphas_adam(w, bases, steps=200), bases)).norm()
    assert closed <= adam + 1e-6


def test_residual_scheme_beats_the_fixed_grid_at_large_M():
    w = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(0))
    grid = lambda M: ((w - combine(fit_alphas(w, weight_bases(w, M)), weight_bases(w, M))).norm() / w.norm()).item()
    resid = lambda M: ((w - combine(*reversed(residual_bases(w, M)))).norm() / w.norm()).item()
    assert 0.2 < grid(8) < 0.32  # the paper's grid stalls near 0.26 for Gaussian weights
    errors = [resid(M) for M in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < grid(8) / 2


def np_nearest_codes(w, alphas, scope):
    """Brute force: every sign vector b ∈ {±1}ᴹ, and for each entry the b of the nearest Σ αₘbₘ."""
    M = alphas.shape[0]
    codes = np.array([[1.0 if (k >> m) & 1 else -1.0 for m in range(M)] for k in range(2 ** M)])
    a = alphas.reshape(M, -1).T  # (G, M)
    flat = w.reshape(a.shape[0], -1)
    values = a @ codes.T  # (G, 2^M)
    best = np.abs(flat[:, :, None] - values[:, None, :]).argmin(axis=2)  # (G, n)
    return codes[best].transpose(2, 0, 1).reshape(M, *w.shape), np.take_along_axis(values, best, 1).reshape(w.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("M", [1, 2, 3, 5])
@pytest.mark.parametrize("scope", ["per_layer", "per_channel"])
def test_nearest_code_bases_match_brute_force(shape, M, scope):
    gen = torch.Generator().manual_seed(M)
    w = torch.randn(shape, dtype=torch.float64, generator=gen)
    alphas = torch.rand((M,) if scope == "per_layer" else (M, shape[0]), dtype=torch.float64, generator=gen)
    bases = nearest_code_bases(w, alphas, scope)
    assert bases.shape == (M, *shape) and set(bases.unique().tolist()) <= {-1.0, 1.0}
    _, expected_values = np_nearest_codes(w.numpy(), alphas.numpy(), scope)
    # the same value (codes of equal value are interchangeable), and no code nearer than it
    np.testing.assert_allclose(combine(alphas, bases).numpy(), expected_values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scope", ["per_layer", "per_channel"])
@pytest.mark.parametrize("M", [1, 2, 3, 5])
def test_alternating_bases_never_worse_than_residual(scope, M):
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(M))
    error = lambda bases, alphas: ((w - combine(alphas, bases)).norm() / w.norm()).item()
    errors = [error(*alternating_bases(w, M, scope, rounds=r)) for r in range(4)]  # rounds=0: the residual bases
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:]))
    if M >= 3:  # a Gaussian tensor: the residual bases are far from optimal there
        assert errors[-1] < 0.9 * errors[0]
    bases, alphas = alternating_bases(w, M, scope)
    np.testing.assert_allclose(alphas.double().numpy(), np_alphas(w.double().numpy(), bases.double().numpy(), scope),
                               rtol=1e-4, atol=1e-6)  # α: least squares for the final bases


def test_a_weight_halfway_between_two_code_values_takes_the_smaller():
    alphas = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)  # values -1, 0 (6 codes), +1
    w = torch.tensor([[0.5, -0.5, 0.75, 0.0]], dtype=torch.float64)
    assert combine(alphas, nearest_code_bases(w, alphas)).tolist() == [[0.0, -1.0, 1.0, 0.0]]


def test_nearest_code_bases_refuse_alphas_of_the_wrong_shape():
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="must have shape"):
        nearest_code_bases(w, torch.rand(3, 4), "per_channel")  # 4 channels' alphas for 8 (8 = 2 x 4: reshapes)
    with pytest.raises(ValueError, match="must have shape"):
        nearest_code_bases(w, torch.rand(3, 8), "per_layer")


def test_alternating_bases_too_many_for_the_config(compose_cfg):
    from abc_experiments.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"abc.M=13 with abc.bases=alternating"):
        validate(compose_cfg(["abc.M=13", "abc.bases=alternating"]))
    with pytest.raises(ConfigError, match=r"abc.layers.conv2.M=13 with abc.bases=alternating"):
        validate(compose_cfg(["abc.bases=alternating", "abc.layers={conv2: {M: 13, N: 1}}"]))
    validate(compose_cfg(["abc.M=13", "abc.bases=residual"]))  # fine with the greedy scheme
    with pytest.raises(ValueError, match="M = 13"):
        WeightBinarizer(13, bases="alternating")


def test_alternating_scheme_in_the_binarizer_and_too_many_codes_refused():
    w = torch.randn(8, 4, 3, 3)
    binarizer = WeightBinarizer(3, bases="alternating").eval()
    binarizer.refit(w)
    bases, alphas = alternating_bases(w, 3)
    assert torch.equal(binarizer.alphas, alphas)
    assert torch.equal(binarizer(w), combine(alphas, bases))
    with pytest.raises(ValueError, match="M = 13"):
        alternating_bases(w, 13)


@pytest.mark.parametrize("scope", ["per_layer", "per_channel"])
@pytest.mark.parametrize("learn_u", [False, True])
def test_straight_through_gradients(scope, learn_u):
    """∂c/∂W = Σₘ αₘ ∂c/∂Bₘ = (Σα) ∂c/∂Ŵ;  ∂c/∂uₘ = Σ αₘ·std·∂c/∂Ŵ."""
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    binarizer = WeightBinarizer(3, scope, learn_u=learn_u, out_channels=6).double()
    upstream = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    (binarizer(w) * upstream).sum().backward()
    alphas = binarizer.alphas.numpy()
    a = alphas if scope == "per_layer" else alphas[:, :, None, None, None]
    expected_w = a.sum(0) * upstream.numpy()
    np.testing.assert_allclose(w.grad.numpy(), expected_w, rtol=1e-10)
    if learn_u:
        wn = w.detach().numpy()
        std = wn.std() if scope == "per_layer" else wn.std(axis=(1, 2, 3), keepdims=True)
        expected_u = [(a[m] * std * upstream.numpy()).sum() for m in range(3)]
        np.testing.assert_allclose(binarizer.shifts.grad.numpy(), expected_u, rtol=1e-10)


def test_alphas_refit_in_training_and_frozen_in_eval():
    w = torch.randn(4, 4, 3, 3)
    binarizer = WeightBinarizer(2)
    binarizer(w)
    fitted = binarizer.alphas.clone()
    binarizer(w * 3)
    assert torch.allclose(binarizer.alphas, fitted * 3, rtol=1e-5)
    binarizer.eval()
    frozen = binarizer.alphas.clone()
    binarizer(w * 10)
    assert torch.equal(binarizer.alphas, frozen)


@pytest.mark.parametrize("bad_M", [0, -2, 1.5, "3", True, None])
def test_bad_M_is_a_value_error(bad_M):
    with pytest.raises(ValueError, match="M must be"):
        weight_bases(torch.randn(3, 3), bad_M)


def test_unknown_scope_is_a_value_error():
    with pytest.raises(ValueError, match="unknown scope 'per_pixel'"):
        weight_bases(torch.randn(3, 3), 2, scope="per_pixel")
    with pytest.raises(ValueError, match="unknown scope"):
        WeightBinarizer(2, scope="layer")
