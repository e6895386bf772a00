"""What ``abc-sensitivity`` writes into ``RUN_DIR/sensitivity/``: the JSON, a Markdown table and one figure."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoints import atomic_write_text
from .measure import Sensitivity

OUTPUT_DIR = "sensitivity"
JSON_FILE, TABLE_FILE, PLOT_FILE = "sensitivity.json", "sensitivity.md", "sensitivity.png"


def _error(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


def markdown_table(result: Sensitivity) -> str:
    """The per-layer table (Markdown), with a heading line that names the run and the reference accuracies.

    Args:
        result: what :func:`~abc_experiments.sensitivity.layer_sensitivity` measured.

    Returns:
        The Markdown text: a title, the FP and all-converted accuracies, one row per converted layer
        in forward order, and what the columns mean.
    """
    se = _standard_error(result.fp_acc, result.val_images)
    reuse = "recalibrated from scratch" if result.calibration == "exact" else "reusing the all-converted fits"
    lines = [
        f"# Layer sensitivity: {result.model} on {result.dataset}, ABC(M={result.M}, N={result.N})",
        "",
        f"Validation accuracy ({result.val_images} images, standard error about {se:.1f} points): "
        f"FP {result.fp_acc:.2f}%, all {len(result.layers)} layers converted {result.all_acc:.2f}% "
        f"({result.all_acc - result.fp_acc:+.2f}){_losses(result)}. Calibration: {result.calibration_batches} "
        f"batches, 'all but' {reuse}.",
        "",
        "| # | layer | M | N | MACs | W err | A err | out err | inherited | only this | Δ vs FP | Δ loss "
        "| all but this | Δ vs all | Δ loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for index, layer in enumerate(result.layers, 1):
        lines.append(
            f"| {index} | {layer.name} | {layer.M} | {layer.N} | {layer.macs:,} | {_error(layer.weight_error)} | "
            f"{_error(layer.activation_error)} | {_error(layer.output_error)} | {_error(layer.inherited_error)} | "
            f"{layer.only_acc:.2f} | {-layer.only_drop(result.fp_acc):+.2f} | "
            f"{_difference(layer.only_loss, result.fp_loss)} | {layer.all_but_acc:.2f} | "
            f"{layer.all_but_gain(result.all_acc):+.2f} | {_difference(layer.all_but_loss, result.all_loss)} |")
    lines += [
        "",
        "W err, A err: relative weight and activation reconstruction errors in the all-converted model. "
        "out err: relative error of the layer's output in the all-converted model against the FP model; "
        "inherited: the same for the FP layer fed the converted model's input (the part the layers before it "
        "pass on). only this: accuracy with only this layer converted; all but this: every other layer converted; "
        "Δ loss: the change of the mean validation cross-entropy against the FP and the all-converted model "
        "(paired and continuous: less noisy than the accuracies, and what --budget ranks the layers by).",
    ]
    if result.kept:
        lines += ["", "Kept full precision by the run: "
                  + ", ".join(f"{name} ({why})" for name, why in result.kept.items()) + "."]
    return "\n".join(lines) + "\n"


def _difference(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{value - reference:+.3f}"


def _losses(result: Sensitivity) -> str:
    if result.fp_loss is None or result.all_loss is None:
        return ""
    return f"; validation loss FP {result.fp_loss:.3f}, all converted {result.all_loss:.3f}"


def _standard_error(acc: float, count: int) -> float:
    p = min(max(acc / 100.0, 0.0), 1.0)
    return 100.0 * (p * (1 - p) / max(count, 1)) ** 0.5


def plot(result: Sensitivity, path: Path) -> Path:
    """One figure: per layer (forward order) the accuracy lost by converting it alone and won back by
    keeping it full precision (top), and the errors through depth (bottom). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [layer.name for layer in result.layers]
    x = list(range(len(names)))
    width = max(11.0, 0.45 * len(names) + 2.5)  # the legends above the panels need 11 inches
    fig = Figure(figsize=(width, 6.8), dpi=120)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.1, 1]})
    drops = [layer.only_drop(result.fp_acc) for layer in result.layers]
    gains = [layer.all_but_gain(result.all_acc) for layer in result.layers]
    top.bar([i - 0.2 for i in x], drops, width=0.4, color="#d62728",
            label="lost converting only this layer (FP − only)")
    top.bar([i + 0.2 for i in x], gains, width=0.4, color="#1f77b4",
            label="won back keeping only this layer FP (all-but − all)")
    top.axhline(0, color="black", linewidth=0.8)
    se = _standard_error(result.fp_acc, result.val_images)
    top.axhspan(-se, se, color="grey", alpha=0.15, linewidth=0, label=f"± 1 standard error ({se:.1f} pp)")
    top.set_ylabel("validation accuracy (points)")
    fig.suptitle(f"{result.model} on {result.dataset}, ABC(M={result.M}, N={result.N}): FP {result.fp_acc:.1f}%, "
                 f"all converted {result.all_acc:.1f}% ({result.val_images} val images)", fontsize=10)
    top.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    bottom.plot(x, [layer.output_error for layer in result.layers], "o-", color="black",
                label="output error (all converted vs FP)")
    bottom.plot(x, [layer.inherited_error for layer in result.layers], "o--", color="grey",
                label="inherited from the layers before")
    bottom.plot(x, [layer.weight_error for layer in result.layers], "s:", color="#2ca02c", label="weight error")
    activation = [layer.activation_error for layer in result.layers]
    if any(value is not None for value in activation):
        bottom.plot(x, [float("nan") if value is None else value for value in activation], "^:", color="#9467bd",
                    label="activation error")
    bottom.set_ylabel("relative error")
    bottom.set_ylim(bottom=0)
    bottom.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    bottom.set_xlim(-0.7, max(len(names), 4) - 0.3)  # a few layers keep bars of the usual width
    bottom.set_xticks(x)
    bottom.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    bottom.set_xlabel("converted layer (forward order)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def write_outputs(result: Sensitivity, out_dir: str | Path) -> dict[str, Path]:
    """Write ``sensitivity.json``, ``sensitivity.md`` and ``sensitivity.png`` into ``out_dir``.

    Args:
        result: what :func:`~abc_experiments.sensitivity.layer_sensitivity` measured.
        out_dir: the folder (created if missing), by default ``RUN_DIR/sensitivity``.

    Returns:
        ``{"json": path, "table": path, "plot": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_FILE, "table": out_dir / TABLE_FILE, "plot": out_dir / PLOT_FILE}
    atomic_write_text(json.dumps(result.to_dict(), indent=2) + "\n", paths["json"])
    atomic_write_text(markdown_table(result), paths["table"])
    plot(result, paths["plot"])
    return paths
