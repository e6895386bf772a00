"""Binary weight bases and their scaling factors (ABC-Net, Lin, Zhao & Pan, NIPS 2017, arXiv 1711.11294).

ABC-Net approximates a real-valued weight tensor W by a linear combination of M binary tensors::

    W ≈ Σₘ αₘ Bₘ,    Bₘ = sign(W − mean(W) + uₘ · std(W)),    uₘ = −1 + 2(m − 1)/(M − 1)

(Section 3.1, eq. 2–4), with u = 0 when M = 1, sign(0) = +1 so that every entry is exactly ±1, and
α the least-squares solution of  min_α ‖W − Σₘ αₘBₘ‖²  (eq. 3), computed in closed form.

Two scopes:

* ``per_layer`` (the paper): one mean, one std and one α-vector of length M for the whole tensor;
* ``per_channel`` (an extension): statistics and α per output channel (dim 0), α of shape (M, C_out).

Two basis schemes:

* ``shifted`` (the paper): the fixed grid of shifts uₘ above (optionally learned, ``learn_u``);
* ``residual`` (for comparison): B₁ = sign(W − mean(W)) and Bₖ = sign(Rₖ₋₁), the sign of what the
  first k − 1 bases, with jointly refitted alphas, leave unexplained;
* ``alternating``: the residual bases, then a few rounds of alternating minimisation (Xu et al.,
  "Alternating Multi-bit Quantization", ICLR 2018): for fixed α each weight takes the nearest of
  the 2ᴹ values Σₘ αₘbₘ (b ∈ {±1}ᴹ; the optimal bases for those α), then α is refitted by least
  squares. Neither step can raise ‖W − Σ αB‖, so the error is at most the residual bases'.

Statistics use the population standard deviation (numpy's default, ``ddof=0``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SCOPES = ("per_layer", "per_channel")
BASES = ("shifted", "residual", "alternating")
MAX_ALTERNATING_M = 12  # 2^M codes per layer or channel
ALTERNATING_ROUNDS = 4  # rounds after the residual start (the error changes little after 2-3)
ALPHA_FITS = ("lstsq", "adam")


def check_scope(scope: str) -> str:
    """Validate a scope name.

    Args:
        scope: ``"per_layer"`` or ``"per_channel"``.

    Returns:
        ``scope``; a ValueError naming the choices otherwise.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}: choose one of {', '.join(SCOPES)}")
    return scope


def check_count(name: str, value, minimum: int) -> int:
    """Validate M (minimum 1) or N (minimum 0): an integer, not a bool, at least ``minimum``.

    Args:
        name: the name the error message gives the value (``"M"``, ``"N"``).
        value: the value to check.
        minimum: the smallest value allowed.

    Returns:
        ``value``; a ValueError saying what is wrong otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return value


def is_exporting() -> bool:
    """True while ``torch.export`` (also behind ``torch.onnx.export(dynamo=True)``) or ``torch.jit``
    traces or scripts the model: the layers then emit plain, value-only ops (no STE terms, no
    autograd Function, no data-pointer cache).

    Returns:
        Whether an export, trace or script is in progress.
    """
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    return bool(torch.compiler.is_exporting())


def sign(x: Tensor) -> Tensor:
    """Sign with sign(0) = +1, so the result holds only ±1 (``torch.sign`` maps 0 to 0).

    Args:
        x: any tensor.

    Returns:
        ±1 of ``x``'s shape and dtype.
    """
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def weight_shifts(M: int, dtype=torch.float32, device=None) -> Tensor:
    """The paper's shift grid uₘ = −1 + 2(m − 1)/(M − 1), m = 1..M; u = (0,) for M = 1.

    Args:
        M: the number of bases (≥ 1).
        dtype: the dtype of the result.
        device: the device of the result.

    Returns:
        (M,) shifts uₘ, evenly spaced over [−1, 1].
    """
    check_count("M", M, 1)
    if M == 1:
        return torch.zeros(1, dtype=dtype, device=device)
    return torch.linspace(-1.0, 1.0, M, dtype=dtype, device=device)


def _stat_dims(weight: Tensor, scope: str) -> tuple[int, ...] | None:
    """Dimensions reduced for the statistics: all of them per layer, all but dim 0 per channel."""
    check_scope(scope)
    return None if scope == "per_layer" else tuple(range(1, weight.dim()))


def weight_statistics(weight: Tensor, scope: str = "per_layer") -> tuple[Tensor, Tensor]:
    """mean(W) and std(W) (population, ``ddof=0``).

    Args:
        weight: the weight W.
        scope: ``"per_layer"`` (one mean and std) or ``"per_channel"`` (per output channel, dim 0).

    Returns:
        (mean, std), broadcastable against W.
    """
    dims = _stat_dims(weight, scope)
    if dims is None:
        return weight.mean(), weight.std(unbiased=False)
    return weight.mean(dim=dims, keepdim=True), weight.std(dim=dims, unbiased=False, keepdim=True)


def weight_bases(weight: Tensor, M: int, scope: str = "per_layer", shifts: Tensor | None = None) -> Tensor:
    """Binary bases Bₘ = sign(W − mean(W) + uₘ·std(W)) (paper eq. 4).

    Args:
        weight: the weight W.
        M: the number of bases (≥ 1).
        scope: ``"per_layer"`` or ``"per_channel"`` statistics.
        shifts: M shifts replacing the paper's grid uₘ (e.g. learned shifts); None: the grid.

    Returns:
        (M, *W.shape) tensor of ±1 in W's dtype.
    """
    check_count("M", M, 1)
    u = weight_shifts(M, weight.dtype, weight.device) if shifts is None else shifts.to(weight.dtype)
    if u.numel() != M:
        raise ValueError(f"expected {M} shifts, got {u.numel()}")
    mean, std = weight_statistics(weight, scope)
    centred = weight - mean
    return sign(centred.unsqueeze(0) + u.view(-1, *([1] * weight.dim())) * std.unsqueeze(0))


def _flatten(weight: Tensor, bases: Tensor, scope: str) -> tuple[Tensor, Tensor]:
    """Views for the least-squares problem: W as (G, n) and B as (G, M, n), G = 1 or C_out."""
    check_scope(scope)
    M = bases.shape[0]
    if scope == "per_layer":
        return weight.reshape(1, -1), bases.reshape(1, M, -1)
    C = weight.shape[0]
    return weight.reshape(C, -1), bases.reshape(M, C, -1).transpose(0, 1)


def _solver_device(device: torch.device) -> torch.device:
    # float64 is not available on MPS; the M×M systems are tiny, so solve them on the CPU there.
    return torch.device("cpu") if device.type == "mps" else device


def fit_alphas(weight: Tensor, bases: Tensor, scope: str = "per_layer") -> Tensor:
    """Closed-form α = argmin ‖W − Σₘ αₘBₘ‖² (eq. 3 of the paper), per layer or per output channel.

    Solves the normal equations G α = Bᵀw on the M×M Gram matrix G = BBᵀ in float64 with a
    pseudo-inverse, so coinciding bases (tiny layers, M larger than the number of distinct values)
    give the minimum-norm solution instead of a singular-matrix error. The residual W − Σ αB is
    orthogonal to every basis. No gradient.

    Args:
        weight: the weight W.
        bases: (M, *W.shape) binary bases.
        scope: ``"per_layer"`` or ``"per_channel"``.

    Returns:
        The alphas in W's dtype: shape (M,) per layer, (M, C_out) per channel.
    """
    with torch.no_grad():
        solver = _solver_device(weight.device)
        w, b = (t.to(solver, torch.float64) for t in _flatten(weight, bases, scope))
        gram = torch.bmm(b, b.transpose(1, 2))  # (G, M, M), exact integer counts in float64
        rhs = torch.bmm(b, w.unsqueeze(-1))  # (G, M, 1)
        alphas = torch.linalg.pinv(gram, hermitian=True, rtol=1e-10) @ rhs
        alphas = alphas.squeeze(-1).to(weight.device, weight.dtype)  # (G, M)
        return alphas[0] if scope == "per_layer" else alphas.t().contiguous()


def fit_alphas_adam(
    weight: Tensor,
    bases: Tensor,
    scope: str = "per_layer",
    steps: int = 200,
    lr: float = 1e-2,
    init: Tensor | None = None,
) -> Tensor:
    """The seed notebook's alpha fit: ``steps`` Adam iterations on ‖W − Σₘ αₘBₘ‖², for comparison.

    Slower and never better than :func:`fit_alphas`, which solves the same problem exactly.

    Args:
        weight: the weight W.
        bases: (M, *W.shape) binary bases.
        scope: ``"per_layer"`` or ``"per_channel"``.
        steps: Adam iterations.
        lr: Adam's learning rate.
        init: the alphas to start from (e.g. the previous step's); None: mean|W|/M.

    Returns:
        The alphas, shaped as :func:`fit_alphas` shapes them; no gradient.
    """
    w, b = _flatten(weight.detach(), bases.detach(), scope)
    if init is None:
        start = w.abs().mean(dim=1, keepdim=True).expand(-1, b.shape[1]) / b.shape[1]
    else:
        start = init.detach().reshape(b.shape[1], -1).t()
    alphas = start.clone().to(w.dtype).requires_grad_(True)
    optimizer = torch.optim.Adam([alphas], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            error = (w - torch.einsum("gm,gmn->gn", alphas, b)).pow(2).mean()
            error.backward()
            optimizer.step()
    result = alphas.detach()
    return result[0] if scope == "per_layer" else result.t().contiguous()


def _expand_alphas(alphas: Tensor, weight: Tensor) -> Tensor:
    """Alphas shaped to broadcast against the stacked bases (M, *W.shape)."""
    if alphas.dim() == 1:
        return alphas.view(-1, *([1] * weight.dim()))
    return alphas.view(alphas.shape[0], alphas.shape[1], *([1] * (weight.dim() - 1)))


def combine(alphas: Tensor, bases: Tensor) -> Tensor:
    """Σₘ αₘBₘ.

    Args:
        alphas: per-layer (M,) or per-channel (M, C_out) alphas.
        bases: (M, *W.shape) binary bases.

    Returns:
        The approximation Ŵ, of W's shape.
    """
    return (_expand_alphas(alphas, bases[0]) * bases).sum(dim=0)


def residual_bases(weight: Tensor, M: int, scope: str = "per_layer") -> tuple[Tensor, Tensor]:
    """Greedy residual bases: B₁ = sign(W − mean(W)), Bₖ = sign(W − Σ_{j<k} αⱼBⱼ), alphas refitted
    jointly by least squares after each step (no gradient).

    Args:
        weight: the weight W.
        M: the number of bases (≥ 1).
        scope: ``"per_layer"`` or ``"per_channel"``.

    Returns:
        (bases, alphas): (M, *W.shape) bases and their least-squares alphas (see :func:`fit_alphas`).
    """
    check_count("M", M, 1)
    with torch.no_grad():
        mean, _ = weight_statistics(weight, scope)
        bases = sign(weight - mean).unsqueeze(0)
        alphas = fit_alphas(weight, bases, scope)
        for _ in range(1, M):
            bases = torch.cat([bases, sign(weight - combine(alphas, bases)).unsqueeze(0)])
            alphas = fit_alphas(weight, bases, scope)
    return bases, alphas


def nearest_code_bases(weight: Tensor, alphas: Tensor, scope: str = "per_layer") -> Tensor:
    """The bases that minimise ‖W − Σₘ αₘBₘ‖ for fixed α: each entry of W takes the nearest of the
    2ᴹ values Σₘ αₘbₘ, b ∈ {±1}ᴹ (per layer, or per output channel with per-channel α). Ties go
    to the smaller value; codes of equal value to the first in sort order.

    Args:
        weight: the weight W.
        alphas: (M,) per layer or (M, C_out) per channel.
        scope: ``"per_layer"`` or ``"per_channel"``.

    Returns:
        (M, *W.shape) tensor of ±1 in W's dtype.
    """
    check_scope(scope)
    M = alphas.shape[0] if alphas.dim() else 0
    expected = (M,) if scope == "per_layer" else (M, weight.shape[0])
    if alphas.dim() == 0 or tuple(alphas.shape) != expected:
        raise ValueError(f"nearest_code_bases: {scope} alphas for a weight of shape {tuple(weight.shape)} must have "
                         f"shape (M,){'' if scope == 'per_layer' else ' + (C_out,)'}, got {tuple(alphas.shape)}")
    check_code_count(M)
    with torch.no_grad():
        solver = _solver_device(weight.device)  # float64 (not on MPS)
        bits = (torch.arange(2 ** M, device=solver).unsqueeze(1) >> torch.arange(M, device=solver)) & 1
        codes = (2 * bits - 1).to(torch.float64)  # (2^M, M): code k has +1 at bit m of k, else -1
        a = alphas.to(solver, torch.float64).reshape(M, -1).t()  # (G, M)
        values, order = torch.sort(a @ codes.t(), dim=1, stable=True)  # (G, 2^M) code values, ascending
        w = weight.to(solver, torch.float64).reshape(a.shape[0], -1)  # (G, n)
        bucket = torch.searchsorted((values[:, 1:] + values[:, :-1]) / 2, w.contiguous())  # nearest value
        chosen = torch.gather(order, 1, bucket)  # (G, n) code index
        bases = codes[chosen]  # (G, n, M)
        return bases.permute(2, 0, 1).reshape(M, *weight.shape).to(weight.device, weight.dtype)


def check_code_count(M: int) -> None:
    """The alternating bases enumerate the 2ᴹ codes: refuse M > MAX_ALTERNATING_M."""
    if M > MAX_ALTERNATING_M:
        raise ValueError(f"alternating bases enumerate the 2^M codes: M = {M} is over {MAX_ALTERNATING_M}; "
                         "use bases='residual' for more bases")


def alternating_bases(weight: Tensor, M: int, scope: str = "per_layer",
                      rounds: int = ALTERNATING_ROUNDS) -> tuple[Tensor, Tensor]:
    """Residual bases refined by alternating minimisation (Xu et al., ICLR 2018): ``rounds`` times,
    the nearest-code bases for the current α (:func:`nearest_code_bases`), then α by least squares
    (:func:`fit_alphas`). The error never rises above the residual bases' (no gradient).

    Args:
        weight: the weight W.
        M: the number of bases (≥ 1).
        scope: ``"per_layer"`` or ``"per_channel"``.
        rounds: alternating rounds after the residual start (0: the residual bases).

    Returns:
        (bases, alphas), as :func:`residual_bases` returns them.
    """
    check_code_count(M)
    bases, alphas = residual_bases(weight, M, scope)
    with torch.no_grad():
        for _ in range(rounds):
            bases = nearest_code_bases(weight, alphas, scope)
            alphas = fit_alphas(weight, bases, scope)
    return bases, alphas


def relative_error(weight: Tensor, approximation: Tensor) -> float:
    """‖W − Ŵ‖ / ‖W‖.

    Args:
        weight: the reference W.
        approximation: its approximation Ŵ.

    Returns:
        The relative error (0.0 for an all-zero W).
    """
    norm = weight.norm().item()
    return (weight - approximation).norm().item() / norm if norm > 0 else 0.0


class WeightBinarizer(nn.Module):
    """W ↦ Σₘ αₘBₘ with a straight-through gradient (paper eq. 5).

    In training mode the bases and the closed-form alphas are recomputed from the current W in
    every forward pass; ``eval()`` refits them once and freezes them in the ``alphas`` buffer
    (which is what evaluation and exported checkpoints use).

    Gradient: sign is treated as the identity (STE), the statistics and α as constants, so
    ∂c/∂W = Σₘ αₘ ∂c/∂Bₘ = (Σₘ αₘ) ∂c/∂Ŵ, with Ŵ = Σ αₘBₘ; with ``learn_u`` also
    ∂c/∂uₘ = αₘ · std(W) · Σ ∂c/∂Ŵ.

    Args:
        M: the number of bases (≥ 1).
        scope: ``"per_layer"`` (the paper) or ``"per_channel"``.
        bases: ``"shifted"`` (the paper's grid), ``"residual"`` (greedy) or ``"alternating"``
            (residual, then alternating minimisation).
        learn_u: learn the shifts uₘ (shifted bases only).
        alpha_fit: ``"lstsq"`` (closed form) or ``"adam"`` (the seed notebook's loop).
        adam_steps: Adam iterations per fit with ``alpha_fit="adam"``.
        out_channels: C_out, the length of the per-channel alphas.
    """

    def __init__(
        self,
        M: int,
        scope: str = "per_layer",
        bases: str = "shifted",
        learn_u: bool = False,
        alpha_fit: str = "lstsq",
        adam_steps: int = 200,
        out_channels: int = 1,
    ):
        super().__init__()
        self.M = check_count("M", M, 1)
        self.scope = check_scope(scope)
        if bases not in BASES:
            raise ValueError(f"unknown bases {bases!r}: choose one of {', '.join(BASES)}")
        if alpha_fit not in ALPHA_FITS:
            raise ValueError(f"unknown alpha_fit {alpha_fit!r}: choose one of {', '.join(ALPHA_FITS)}")
        if learn_u and bases != "shifted":
            raise ValueError("learn_u applies to the shifted bases only (bases='shifted')")
        if bases == "alternating":
            check_code_count(M)
        self.bases_scheme, self.alpha_fit, self.adam_steps = bases, alpha_fit, adam_steps
        shifts = weight_shifts(M)
        if learn_u:
            self.shifts = nn.Parameter(shifts)
        else:
            self.register_buffer("shifts", shifts)
        alpha_shape = (M,) if scope == "per_layer" else (M, out_channels)
        self.register_buffer("alphas", torch.zeros(alpha_shape))

    def compute_bases(self, weight: Tensor) -> Tensor:
        """The current bases, without gradient.

        Args:
            weight: the layer's weight W.

        Returns:
            (M, *W.shape) binary bases for the current shifts.
        """
        with torch.no_grad():
            if self.bases_scheme != "shifted":
                return self._fitted_bases(weight)[0]
            return weight_bases(weight, self.M, self.scope, self.shifts.detach())

    def _fitted_bases(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(bases, least-squares alphas) of the residual or alternating scheme."""
        if self.bases_scheme == "alternating":
            return alternating_bases(weight, self.M, self.scope)
        return residual_bases(weight, self.M, self.scope)

    def refit(self, weight: Tensor) -> Tensor:
        """Recompute the bases and their alphas from ``weight`` and store the alphas.

        Args:
            weight: the layer's weight W.

        Returns:
            The (M, *W.shape) bases the stored alphas were fitted to.
        """
        with torch.no_grad():
            if self.bases_scheme != "shifted":
                bases, alphas = self._fitted_bases(weight)  # already least squares
            else:
                bases = self.compute_bases(weight)
                alphas = None
            if self.alpha_fit == "adam":
                init = self.alphas if bool(self.alphas.any()) else None
                alphas = fit_alphas_adam(weight, bases, self.scope, self.adam_steps, init=init)
            elif alphas is None:
                alphas = fit_alphas(weight, bases, self.scope)
            self.alphas.copy_(alphas)
        return bases

    def current_bases(self, weight: Tensor) -> Tensor:
        """The bases for this forward pass: training refits the alphas to the current W (every
        step); eval keeps the frozen alphas.

        Args:
            weight: the layer's weight W.

        Returns:
            (M, *W.shape) binary bases, without gradient.
        """
        return self.refit(weight) if self.training else self.compute_bases(weight)

    def _shift_carrier(self, weight: Tensor) -> Tensor | None:
        """Zero-valued (M, …) term carrying ∂Bₘ/∂uₘ = std(W) when the shifts are learned."""
        if not isinstance(self.shifts, nn.Parameter):
            return None
        _, std = weight_statistics(weight.detach(), self.scope)
        u = self.shifts - self.shifts.detach()
        return u.view(-1, *([1] * weight.dim())) * std.unsqueeze(0)

    def bases_with_grad(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The bases, each carrying its own STE gradient (the naive M·N reference path).

        Args:
            weight: the layer's weight W.

        Returns:
            (bases, alphas): (M, *W.shape) bases with gradient to W (and to learned shifts), and the alphas.
        """
        bases = self.current_bases(weight) + (weight - weight.detach()).unsqueeze(0)
        shift_carrier = self._shift_carrier(weight)
        return (bases if shift_carrier is None else bases + shift_carrier), self.alphas

    def approximation(self, weight: Tensor) -> Tensor:
        """Σ αₘBₘ with the stored alphas, no gradient; cached until W, the alphas or the shifts
        change (their tensor versions), so eval passes do not rebuild the bases.

        While the model is exported or traced, the cache (filled by ``eval()`` and by eager eval
        passes) is used if it is still that of the real W, alphas and shifts: the graph then holds
        Σ αₘBₘ as one constant, exactly the eager weight. Otherwise (and under ``torch.compile``)
        the bases are computed from W by plain ops inside the graph; another runtime may then
        round mean/std differently and flip the sign of an entry lying on a basis' boundary.

        Args:
            weight: the layer's weight W.

        Returns:
            Ŵ = Σ αₘBₘ, W's shape, without gradient.
        """
        if is_exporting() or torch.compiler.is_compiling():
            if self._cache_is_current():
                return self._cache
            if self.bases_scheme != "shifted":
                return combine(self.alphas, self._fitted_bases(weight)[0])
            return combine(self.alphas, weight_bases(weight, self.M, self.scope, self.shifts))
        key = self._cache_key_of(weight, self.alphas, self.shifts)
        if getattr(self, "_cache_key", None) != key:
            self._cache = combine(self.alphas, self.compute_bases(weight))
            self._cache_key = key
            # aliases of the real tensors (no copies), to check the cache against while exporting
            self._cache_sources = (weight.detach(), self.alphas.detach(), self.shifts.detach())
        return self._cache

    @staticmethod
    def _cache_key_of(weight: Tensor, alphas: Tensor, shifts: Tensor) -> tuple:
        return (weight.data_ptr(), weight._version, alphas._version, shifts._version)

    def _cache_is_current(self) -> bool:
        sources = getattr(self, "_cache_sources", None)
        if sources is None:
            return False
        try:
            return self._cache_key_of(*sources) == self._cache_key
        except RuntimeError:  # not real tensors after all
            return False

    def forward(self, weight: Tensor) -> Tensor:
        if self.training and not is_exporting():
            approximation = combine(self.alphas, self.refit(weight))  # refit updates the alphas first
        else:
            approximation = self.approximation(weight)
        if is_exporting() or not (torch.is_grad_enabled() and (weight.requires_grad or self.shifts.requires_grad)):
            return approximation  # values only: no STE terms (nothing asks for their gradient)
        alphas = _expand_alphas(self.alphas, weight)
        # STE: zero in value, gradient (Σ αₘ) ∂c/∂Ŵ to W (and αₘ·std·∂c/∂Ŵ to uₘ).
        approximation = approximation + alphas.sum(dim=0) * (weight - weight.detach())
        shift_carrier = self._shift_carrier(weight)
        if shift_carrier is not None:
            approximation = approximation + (alphas * shift_carrier).sum(dim=0)
        return approximation

    def extra_repr(self) -> str:
        return f"M={self.M}, scope={self.scope}, bases={self.bases_scheme}, alpha_fit={self.alpha_fit}"
