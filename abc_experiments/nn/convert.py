"""Swap a trained model's conv (and optionally linear) layers for their ABC versions.

Per-layer precision: ``layers`` maps module-name patterns to ``{"M": m, "N": n}`` overriding the
global M and N for the converted layers they match. Patterns are ``fnmatch`` (shell-style) globs on
the module's qualified name as ``model.named_modules()`` gives it (``layer3.2.conv2``): ``*``
matches any characters, dots included (``layer1.*`` is every layer under ``layer1``), ``?`` one
character, ``[01]`` one of a set; a name without wildcards matches that module only. The FIRST
matching pattern, in the mapping's order, sets a layer's precision; a key it omits (or sets to
None) takes the global value. A pattern that sets no converted layer is an error, so typos and
patterns shadowed by an earlier one are refused before anything trains.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
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
    # Per-layer precision: the (checked) pattern -> {"M", "N"} overrides, each converted layer's
    # {"M": m, "N": n}, and the pattern that set it for the layers one did.
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)
    layer_precision: dict[str, dict[str, int]] = field(default_factory=dict)
    matched: dict[str, str] = field(default_factory=dict)  # layer name -> the pattern that set it

    def to_dict(self) -> dict:
        return {"M": self.M, "N": self.N, "converted": list(self.converted), "kept": dict(self.kept),
                "overrides": {k: dict(v) for k, v in self.overrides.items()},
                "layer_precision": {k: dict(v) for k, v in self.layer_precision.items()},
                "matched": dict(self.matched)}

    def __str__(self) -> str:
        lines = [f"ABC(M={self.M}, N={self.N}): converted {len(self.converted)} layer(s)"]
        for name in self.converted:
            precision = self.layer_precision.get(name, {"M": self.M, "N": self.N})
            pattern = self.matched.get(name)
            lines.append(f"  ABC  {name}" + (f"  M={precision['M']} N={precision['N']}  (layers pattern {pattern!r})"
                                              if pattern is not None else ""))
        lines += [f"  FP   {name}  ({reason})" for name, reason in self.kept.items()]
        return "\n".join(lines)


PRECISION_KEYS = ("M", "N")


class LayerPrecisionError(ValueError):
    """A per-layer precision mapping that cannot be applied: a bad value or key, or a pattern
    that sets no converted layer; the message names the pattern and the fix."""


def check_layer_precision(layers: Mapping | None) -> dict[str, dict[str, int]]:
    """The per-layer precision mapping checked and normalised: ``{pattern: {"M": m, "N": n}}``
    keeping the mapping's order and only the keys that are set (None means "the global value").

    Args:
        layers: pattern -> mapping with ``M`` (≥ 1) and/or ``N`` (≥ 0; 0 = full-precision
            activations); None or empty for none.

    Returns:
        A new dict of plain dicts.

    Raises:
        LayerPrecisionError: a pattern that is not a non-empty string, an entry that is not a
            mapping, an unknown key, or a value that is not an integer in range.
    """
    if layers is None:
        return {}
    if not isinstance(layers, Mapping):
        raise LayerPrecisionError(f"layers must map module-name patterns to {{M, N}}, got {type(layers).__name__} "
                                  f"{layers!r}; e.g. {{'layer1.*': {{'M': 5, 'N': 3}}}}")
    checked: dict[str, dict[str, int]] = {}
    for pattern, entry in layers.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise LayerPrecisionError(f"layers: pattern {pattern!r} is not a module-name pattern (a non-empty "
                                      "string such as 'layer1.*' or 'layer3.2.conv2')")
        if not isinstance(entry, Mapping):
            raise LayerPrecisionError(f"layers[{pattern!r}] = {entry!r}: give a mapping with M and/or N, "
                                      f"e.g. {{M: 5, N: 3}}")
        unknown = [str(key) for key in entry if key not in PRECISION_KEYS]
        if unknown:
            raise LayerPrecisionError(f"layers[{pattern!r}] has unknown key(s) {', '.join(map(repr, unknown))}: "
                                      "each entry takes only M (weight bases) and N (activation bases)")
        values = {}
        for key, minimum in (("M", 1), ("N", 0)):
            value = entry.get(key)
            if value is None:
                continue
            try:
                values[key] = check_count(f"layers[{pattern!r}].{key}", value, minimum)
            except ValueError as error:
                raise LayerPrecisionError(str(error)) from None
        checked[pattern] = values
    return checked


def _list_names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def _assign_precision(report: ConversionReport, overrides: dict[str, dict[str, int]], model_name: str) -> None:
    """Fill ``report.layer_precision`` and ``report.matched``: first matching pattern wins."""
    unused = dict.fromkeys(overrides)
    for name in report.converted:
        precision = {"M": report.M, "N": report.N}
        for pattern, values in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                precision.update(values)
                report.matched[name] = pattern
                unused.pop(pattern, None)
                break
        report.layer_precision[name] = precision
    problems = []
    for pattern in unused:
        kept = [name for name in report.kept if fnmatch.fnmatchcase(name, pattern)]
        shadowing = list(dict.fromkeys(report.matched[name] for name in report.converted
                                       if fnmatch.fnmatchcase(name, pattern)))
        if shadowing:
            problems.append(f"{pattern!r} matches only layers that the earlier pattern(s) "
                            f"{', '.join(map(repr, shadowing))} already set (the first matching pattern wins: "
                            "put the more specific pattern first)")
        elif kept:
            problems.append(f"{pattern!r} matches only layers kept at full precision "
                            f"({'; '.join(f'{name}: {report.kept[name]}' for name in kept)})")
        else:
            problems.append(f"{pattern!r} matches no layer")
    if problems:
        raise LayerPrecisionError(
            f"layers pattern(s) that set no converted layer of {model_name}: {'; '.join(problems)}. Patterns are "
            "fnmatch globs on module names ('*' matches dots too, e.g. 'layer1.*'); the converted layers are "
            f"{_list_names(report.converted)}")


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
    layers: Mapping | None = None,
) -> ConversionReport:
    """Which layers :func:`convert` would convert, at which M and N, and why it would keep the
    others, without changing ``model`` (cheap: a walk over its modules), so a runner can refuse an
    impossible setting before it trains anything.

    Args:
        model: the full-precision model.
        M, N: the global numbers of weight and activation bases (N = 0 or None: full-precision
            activations).
        linear, keep_first, keep_last, exclude: which layers are converted (see :func:`convert`).
        layers: per-layer precision, pattern -> ``{"M": m, "N": n}`` (see the module docstring:
            fnmatch globs on module names, the first matching pattern wins).

    Returns:
        The :class:`ConversionReport`; ``layer_precision`` holds each converted layer's M and N.

    Raises:
        NothingToConvertError: no layer would be converted.
        LayerPrecisionError: a bad ``layers`` entry, or a pattern that sets no converted layer.
    """
    check_count("M", M, 1)
    N = 0 if N is None else check_count("N", N, 0)
    overrides = check_layer_precision(layers)
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
    report.overrides = overrides
    _assign_precision(report, overrides, type(model).__name__)
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
    layers: Mapping | None = None,
    **layer_options,
) -> ConversionReport:
    """Replace eligible layers of ``model`` in place by ABC layers that keep the trained weights.

    Eligible: every ``nn.Conv2d``, and every ``nn.Linear`` when ``linear`` is true. By default the
    first conv (it sees the raw image) and the final classifier (the last linear layer, or the last
    conv in a model without one) stay full precision, standard practice for binary networks;
    ``keep_first=False, keep_last=False, linear=True`` converts every layer. ``exclude`` holds
    ``fnmatch`` patterns of module names to keep (e.g. ``"*.downsample.*"``). N = 0 (or None)
    keeps full-precision activations (weight-only ABC). ``layers`` gives some layers their own M
    and N: ``{"layer1.*": {"M": 5}, "layer3.2.conv2": {"M": 1, "N": 1}}`` (fnmatch globs on module
    names, the first matching pattern wins, an omitted key takes the global value; a pattern that
    sets no converted layer raises :class:`LayerPrecisionError`). ``layer_options`` go to the layers
    (``bases``, ``learn_u``, ``alpha_fit``, ``kernel``).

    Returns:
        The :class:`ConversionReport` (``layer_precision``: each converted layer's M and N).
    """
    report = plan_conversion(model, M, N, linear=linear, keep_first=keep_first, keep_last=keep_last,
                             exclude=exclude, layers=layers)
    for name in report.converted:
        module = model.get_submodule(name)
        M, N = report.layer_precision[name]["M"], report.layer_precision[name]["N"]
        if isinstance(module, nn.Conv2d):
            replacement = ABCConv2d.from_conv(module, M, N, scope=scope, impl=impl, **layer_options)
        else:
            replacement = ABCLinear.from_linear(module, M, N, scope=scope, impl=impl, **layer_options)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
    return report
