"""Swap a trained model's conv (and optionally linear) layers for their ABC versions."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from .layers import ABCConv2d, ABCLayer, ABCLinear
from .weights import check_count


@dataclass
class ConversionReport:
    """Which layers were converted and why the others were kept at full precision."""

    M: int
    N: int
    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # layer name -> reason

    def to_dict(self) -> dict:
        return {"M": self.M, "N": self.N, "converted": list(self.converted), "kept": dict(self.kept)}

    def __str__(self) -> str:
        lines = [f"ABC(M={self.M}, N={self.N}): converted {len(self.converted)} layer(s)"]
        lines += [f"  ABC  {name}" for name in self.converted]
        lines += [f"  FP   {name}  ({reason})" for name, reason in self.kept.items()]
        return "\n".join(lines)


def abc_layers(model: nn.Module) -> list[tuple[str, ABCLayer]]:
    """The ABC layers of a model.

    Args:
        model: any module.

    Returns:
        (name, layer) for every :class:`ABCLayer` in ``model``, in registration order.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ABCLayer)]


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if type(m) in (nn.Conv2d, nn.Linear)]


class NothingToConvertError(ValueError):
    """Every candidate layer would stay full precision; ``report.kept`` says why for each."""

    def __init__(self, message: str, report: ConversionReport, has_linear: bool):
        super().__init__(message)
        self.report, self.has_linear = report, has_linear


def plan_conversion(
    model: nn.Module,
    M: int,
    N: int | None,
    *,
    linear: bool = False,
    keep_first: bool = True,
    keep_last: bool = True,
    exclude: tuple[str, ...] | list[str] = (),
) -> ConversionReport:
    """Which layers :func:`convert` would convert and why it would keep the others, without
    changing ``model`` (cheap: a walk over its modules), so a runner can refuse an impossible
    setting before it trains anything.

    Args:
        model: the trained model.
        M: weight bases (≥ 1).
        N: activation bases (≥ 0; 0 or None: full-precision activations).
        linear: convert hidden ``nn.Linear`` layers too.
        keep_first: keep the first conv at full precision.
        keep_last: keep the final classifier at full precision.
        exclude: ``fnmatch`` patterns of module names to keep.

    Returns:
        The :class:`ConversionReport`: layers to convert, and those kept with the reason.
        Raises :class:`NothingToConvertError` if none would be converted.
    """
    check_count("M", M, 1)
    N = 0 if N is None else check_count("N", N, 0)
    candidates = _candidates(model)
    convs = [name for name, m in candidates if isinstance(m, nn.Conv2d)]
    linears = [name for name, m in candidates if isinstance(m, nn.Linear)]
    first_conv = convs[0] if convs else None
    classifier = linears[-1] if linears else (convs[-1] if convs else None)

    report = ConversionReport(M=M, N=N)
    for name, module in candidates:
        if keep_first and name == first_conv:
            report.kept[name] = "first conv (keep_first)"
        elif keep_last and name == classifier:
            report.kept[name] = "final classifier (keep_last)"
        elif isinstance(module, nn.Linear) and not linear:
            report.kept[name] = "linear layer (linear=False)"
        elif any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            report.kept[name] = "excluded by pattern"
        else:
            report.converted.append(name)
    if not report.converted:
        found = f"{len(convs)} conv and {len(linears)} linear layer(s)"
        raise NothingToConvertError(
            f"nothing to convert in {type(model).__name__}: it has {found}, all kept at full precision "
            f"({'; '.join(f'{k}: {v}' for k, v in report.kept.items()) or 'no Conv2d or Linear layers'}). "
            "Use keep_first=False / keep_last=False / linear=True or fewer exclude patterns.",
            report, bool(linears),
        )
    return report


def convert(
    model: nn.Module,
    M: int,
    N: int | None,
    *,
    scope: str = "per_layer",
    linear: bool = False,
    keep_first: bool = True,
    keep_last: bool = True,
    exclude: tuple[str, ...] | list[str] = (),
    impl: str = "fused",
    **layer_options,
) -> ConversionReport:
    """Replace eligible layers of ``model`` in place by ABC layers that keep the trained weights.

    Eligible: every ``nn.Conv2d``, and every ``nn.Linear`` when ``linear`` is true. By default the
    first conv (it sees the raw image) and the final classifier (the last linear layer, or the last
    conv in a model without one) stay full precision, standard practice for binary networks;
    ``keep_first=False, keep_last=False, linear=True`` converts every layer. ``exclude`` holds
    ``fnmatch`` patterns of module names to keep (e.g. ``"*.downsample.*"``). N = 0 (or None)
    keeps full-precision activations (weight-only ABC).

    Args:
        model: the trained model, changed in place.
        M: weight bases (≥ 1).
        N: activation bases (≥ 0; 0 or None: full-precision activations).
        scope: ``"per_layer"`` (the paper) or ``"per_channel"`` alphas.
        linear: convert hidden ``nn.Linear`` layers too.
        keep_first: keep the first conv at full precision.
        keep_last: keep the final classifier at full precision.
        exclude: ``fnmatch`` patterns of module names to keep.
        impl: ``"fused"`` (one conv) or ``"naive"`` (M·N binary convs).
        **layer_options: ``bases``, ``learn_u``, ``alpha_fit``, ``kernel`` for the layers.

    Returns:
        The :class:`ConversionReport` of what was converted and what was kept (see
        :func:`plan_conversion`, whose errors it raises).
    """
    report = plan_conversion(model, M, N, linear=linear, keep_first=keep_first, keep_last=keep_last,
                             exclude=exclude)
    for name in report.converted:
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            replacement = ABCConv2d.from_conv(module, M, N, scope=scope, impl=impl, **layer_options)
        else:
            replacement = ABCLinear.from_linear(module, M, N, scope=scope, impl=impl, **layer_options)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
    return report
