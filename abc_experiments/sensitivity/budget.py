"""A per-layer {M, N} assignment under a budget of binary operations, from measured sensitivities.

The cost of a layer is M·N·MACs (M·MACs for weight-only layers, N = 0); the budget is a multiple
``X`` of the run's own cost (X = 1: as many binary operations as the run; 0.5: half).

The choice is greedy on a simple model of what a layer's bases buy, stated here because it is a
heuristic, not a measurement of every candidate:

* a layer's reconstruction errors shrink like 1/√k with k bases (ABC's weight error is about 0.6
  at M = 1 and 0.27 at M = 5), so its squared output error at (M, N) is predicted as
  ``w²·M₀/M + a²·N₀/N`` from its measured weight and activation errors w, a at the run's (M₀, N₀);
* the accuracy it costs is its measured sensitivity times that error relative to the run's: the
  sensitivity is the mean of what converting only it loses and what keeping only it full precision
  wins back (negative parts, noise, count as 0), plus 0.1 points so that no layer is ignored. Both
  are measured in validation cross-entropy and turned into accuracy points at the whole model's
  rate (points lost by converting every layer per nat of loss that adds): a paired, continuous
  measure, far less noisy than accuracies on a few hundred images (steps of one image, standard
  error about 2 points), by which the layers were ranked mostly by noise. Measurements from before
  the losses were kept, or a run whose conversion added no loss, use the accuracies themselves.

Every layer starts at M = N = 1 (N = 0 stays 0); then, while the budget allows, the one change of
one layer's (M, N) (to any setting up to ``max_bases``, also fewer of one kind for more of the
other) with the largest predicted gain per added cost is taken. Measure the proposal with
``abc-run ... abc.layers=...``: that is the real test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .measure import Sensitivity

FLOOR = 0.1  # points of sensitivity every layer has, so that none is starved for lack of a measured drop


@dataclass
class Assignment:
    """The proposed per-layer bases under a budget.

    Attributes:
        layers: layer name -> (M, N), in forward order.
        budget: the budget asked for, relative to the run's cost.
        relative_cost: the proposal's cost relative to the run's (at most ``budget``).
        uniform: layer name -> (M, N) of the run.
        sensitivity: layer name -> the sensitivity (points) the choice used.
        measure: what the sensitivities came from: ``"validation loss"`` or ``"validation accuracy"``.
    """

    layers: dict[str, tuple[int, int]]
    budget: float
    relative_cost: float
    uniform: dict[str, tuple[int, int]] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)
    measure: str = "validation accuracy"

    def override(self) -> str:
        """The Hydra override, quoted for a shell: ``'abc.layers={conv2: {M: 3, N: 2}, ...}'``."""
        entries = ", ".join(f"{name}: {{M: {M}, N: {N}}}" for name, (M, N) in self.layers.items())
        return f"'abc.layers={{{entries}}}'"

    def table(self) -> str:
        """A plain-text table: per layer the run's and the proposed (M, N) and the sensitivity used."""
        width = max([len("layer")] + [len(name) for name in self.layers])
        rows = [f"{'layer':<{width}}  {'run M,N':>7}  {'proposed':>8}  {'sensitivity':>11}"]
        for name, (M, N) in self.layers.items():
            M0, N0 = self.uniform[name]
            rows.append(f"{name:<{width}}  {f'{M0},{N0}':>7}  {f'{M},{N}':>8}  {self.sensitivity[name]:>11.2f}")
        rows.append(f"binary operations: {self.relative_cost:.3f} x the run's (budget {self.budget:g}); "
                    f"sensitivities in accuracy points, from the {self.measure}")
        return "\n".join(rows)


def _cost(M: int, N: int, macs: int) -> float:
    return M * max(N, 1) * float(macs)


def _drops(result: Sensitivity) -> tuple[str, dict[str, tuple[float, float]]]:
    """Per layer (lost converting only it, won back keeping only it FP) in accuracy points, and from what."""
    layers = result.layers
    losses = [result.fp_loss, result.all_loss] + [v for layer in layers for v in (layer.only_loss, layer.all_but_loss)]
    if all(v is not None and math.isfinite(v) for v in losses):
        added, lost = result.all_loss - result.fp_loss, result.fp_acc - result.all_acc
        if added > 0 and lost > 0:
            rate = lost / added  # accuracy points per nat of cross-entropy, as the whole model trades them
            return "validation loss", {layer.name: (rate * (layer.only_loss - result.fp_loss),
                                                    rate * (result.all_loss - layer.all_but_loss))
                                       for layer in layers}
    return "validation accuracy", {layer.name: (layer.only_drop(result.fp_acc), layer.all_but_gain(result.all_acc))
                                   for layer in layers}


def propose_assignment(result: Sensitivity, budget: float, max_bases: int = 8) -> Assignment:
    """Choose per-layer (M, N) under ``budget`` × the run's binary operations (see the module docstring).

    Args:
        result: the measured sensitivities of a run (:func:`~abc_experiments.sensitivity.layer_sensitivity`).
        budget: the allowed cost relative to the run's (positive; 1 = the same cost).
        max_bases: the most bases M or N one layer may get.

    Returns:
        The :class:`Assignment`.

    Raises:
        ValueError: a budget that is not positive, or below the cost of every layer at M = N = 1.
    """
    if not budget > 0:
        raise ValueError(f"--budget {budget}: give a positive multiple of the run's binary operations (1 = the same)")
    if max_bases < 1:
        raise ValueError(f"max_bases={max_bases}: give 1 or more")
    layers = result.layers
    if not layers:
        raise ValueError("the measurement holds no converted layer: nothing to assign")
    uniform = {layer.name: (layer.M, layer.N) for layer in layers}
    run_cost = sum(_cost(layer.M, layer.N, layer.macs) for layer in layers)
    if run_cost <= 0:
        raise ValueError("the measured layers have no multiply-accumulates: the budget cannot be split")
    limit = budget * run_cost
    measure, drops = _drops(result)
    sensitivity, weights = {}, {}
    for layer in layers:
        lost, won = drops[layer.name]
        sensitivity[layer.name] = (max(lost, 0.0) + max(won, 0.0)) / 2 + FLOOR
        w = layer.weight_error
        a = layer.activation_error if layer.activation_error is not None else w  # uncalibrated: a guess
        weights[layer.name] = (w * w * layer.M, a * a * layer.N if layer.N > 0 else 0.0)

    def predicted(name: str, M: int, N: int) -> float:
        weight_term, activation_term = weights[name]
        M0, N0 = uniform[name]
        now = weight_term / M + (activation_term / N if N > 0 else 0.0)
        run = weight_term / M0 + (activation_term / N0 if N0 > 0 else 0.0)
        return sensitivity[name] * now / run if run > 0 else 0.0

    macs = {layer.name: layer.macs for layer in layers}
    chosen = {name: (1, 1 if N0 > 0 else 0) for name, (M0, N0) in uniform.items()}
    spent = sum(_cost(M, N, macs[name]) for name, (M, N) in chosen.items())
    if spent > limit * (1 + 1e-12):
        raise ValueError(f"--budget {budget:g} is below the least possible cost, {spent / run_cost:.3f} x the run's "
                         "(every layer at M = N = 1): give at least that")
    options = {name: [(M, N) for M in range(1, max_bases + 1) for N in (range(1, max_bases + 1) if N0 > 0 else [0])]
               for name, (M0, N0) in uniform.items()}
    while True:
        best = None  # (gain per added cost, gain, name, setting, added cost)
        for name, (M, N) in chosen.items():
            now, cost_now = predicted(name, M, N), _cost(M, N, macs[name])
            for new_M, new_N in options[name]:
                added = _cost(new_M, new_N, macs[name]) - cost_now
                gain = now - predicted(name, new_M, new_N)
                if gain <= 1e-12 or spent + added > limit * (1 + 1e-12):
                    continue
                key = (gain / added if added > 0 else float("inf"), gain)
                if best is None or key > best[:2]:
                    best = (*key, name, (new_M, new_N), added)
        if best is None:
            break
        _, _, name, setting, added = best
        chosen[name] = setting
        spent += added
    return Assignment(layers=chosen, budget=budget, relative_cost=spent / run_cost, uniform=uniform,
                      sensitivity=sensitivity, measure=measure)
