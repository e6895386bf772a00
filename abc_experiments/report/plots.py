"""The report's figures: ``accuracy_heatmap.png`` and ``accuracy_vs_size.png``.

Built on :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot state, no display), and
drawn so they do not mislead:

* heatmap colour scales are shared: the fine-tuned accuracy panels of one dataset (one test set)
  share a scale spanning at least :data:`MIN_SPAN_PP` points and at least :data:`SE_SPAN` binomial
  standard errors, so differences within the standard error look alike instead of filling the
  whole colormap; every gap-to-FP panel shares one diverging scale centred at 0, as wide;
* cells that cannot be told apart from the group's best cell (difference within one s.e. of the
  difference) say ``≈ best``, gap cells within one s.e. of FP say ``≈ FP``;
* every accuracy figure states its test-set size and the binomial standard error;
* ``± std`` (cells) appears only for configurations with two or more seeds; the size plot's error
  bars are ± the sample std over seeds where there are two or more, else ± one binomial s.e., and
  its title says which;
* the size plot labels every point (converted and fine-tuned) with its configuration's short id
  (the ``id`` column of report.md), placed by a collision check, and lists the ids in the legend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox

from .aggregate import ConfigResult, _difference_se, _none_last, all_test_sizes, close_calls, format_test_size, groups
from .paper import PaperPoint, paper_reference_points
from .tables import _text, format_n, group_label

MIN_SPAN_PP = 2.0  # the least range (percentage points) a colour scale covers
SE_SPAN = 4.0  # ... and at least this many standard errors, so one s.e. is at most a quarter of it
LABEL_GID = "point-label"  # gid of the id labels in accuracy_vs_size.png (for tests)
ACC_CMAP = "viridis"
GAP_CMAP = "RdBu_r"  # diverging: red = below FP, blue = above FP, white = as good as FP


def _new_figure(**kwargs) -> Figure:
    fig = Figure(dpi=120, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _precision_text(results: Sequence[ConfigResult], column: str = "finetuned_acc_se") -> str:
    """``test set: 359 images, s.e. ≤ 0.9 pp`` (or that the size is not recorded)."""
    sizes = format_test_size(all_test_sizes(results))
    if sizes is None:
        return "test-set size not recorded"
    ses = [r.mean(column) for r in results if r.mean(column) is not None]
    se = f", s.e. ≤ {max(ses):.2f} pp" if ses else ""
    return f"test set: {sizes} images{se}"


def _any_std(results: Sequence[ConfigResult]) -> bool:
    return any(r.n_seeds >= 2 for r in results)


# ---- heatmaps ----------------------------------------------------------------------------------


def span_limits(values: Sequence[float], min_span: float = MIN_SPAN_PP,
                bounds: tuple[float, float] | None = (0.0, 100.0)) -> tuple[float, float]:
    """(vmin, vmax) covering ``values``, widened about their centre to at least ``min_span``
    (and kept within ``bounds`` when it fits)."""
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if high - low < min_span:
        centre = (low + high) / 2
        low, high = centre - min_span / 2, centre + min_span / 2
        if bounds is not None:
            if low < bounds[0]:
                low, high = bounds[0], bounds[0] + min_span
            if high > bounds[1]:
                low, high = bounds[1] - min_span, bounds[1]
    return low, high


def symmetric_limits(values: Sequence[float], min_span: float = MIN_SPAN_PP) -> tuple[float, float]:
    """(−L, L) with L the largest |value|, at least ``min_span / 2``: a scale centred at 0."""
    finite = [abs(v) for v in values if np.isfinite(v)]
    half = max([min_span / 2, *finite])
    return -half, half


def _grid(results: Sequence[ConfigResult], column: str) -> tuple[list, list, np.ndarray, np.ndarray]:
    """M values, N values, and (M x N) arrays of mean and std (NaN where missing / one seed)."""
    ms = sorted({r.M for r in results}, key=_none_last)
    ns = sorted({r.N for r in results}, key=_none_last)
    means = np.full((len(ms), len(ns)), np.nan)
    stds = np.full_like(means, np.nan)
    for r in results:
        stat = r.stats(column)
        if stat is not None:
            i, j = ms.index(r.M), ns.index(r.N)
            means[i, j] = stat[0]
            stds[i, j] = np.nan if stat[1] is None else stat[1]
    return ms, ns, means, stds


def _draw_heatmap(fig: Figure, ax, results: Sequence[ConfigResult], column: str, cmap: str,
                  norm: mcolors.Normalize, title: str, colorbar_label: str,
                  marks: Mapping[tuple, str] | None = None) -> None:
    """One annotated M x N panel of a metric's mean (± std in the cell text with ≥ 2 seeds);
    ``marks`` maps (M, N) to a line added to that cell (e.g. ``≈ best``)."""
    ms, ns, means, stds = _grid(results, column)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(means), cmap=colormap, norm=norm, origin="lower", aspect="auto")
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(colorbar_label, fontsize=10)
    ax.set_xticks(range(len(ns)), [format_n(n) for n in ns])
    ax.set_yticks(range(len(ms)), [_text(m) for m in ms])
    ax.set_xlabel("N (activation bases)", fontsize=11)
    ax.set_ylabel("M (weight bases)", fontsize=11)
    ax.set_title(title, fontsize=11)
    font_size = max(7, 13 - max(len(ms), len(ns)))
    finite = means[np.isfinite(means)]
    decimals = 2 if finite.size and np.ptp(finite) < 1 else 1  # close results still read apart
    for i, j in np.ndindex(means.shape):
        if np.isnan(means[i, j]):
            ax.text(j, i, "not run", ha="center", va="center", fontsize=font_size, color="#555555")
            continue
        text = f"{means[i, j]:.{decimals}f}" + ("" if np.isnan(stds[i, j]) else f"\n±{stds[i, j]:.{decimals}f}")
        mark = (marks or {}).get((ms[i], ns[j]))
        text += f"\n{mark}" if mark else ""
        red, green, blue, _ = colormap(norm(means[i, j]))
        dark_cell = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(j, i, text, ha="center", va="center", fontsize=font_size, color="white" if dark_cell else "black")


def _largest(values) -> float:
    """The largest of ``values`` that is not None (0 when there is none)."""
    return max([v for v in values if v is not None], default=0.0)


def _close_call_marks(results: Sequence[ConfigResult]) -> tuple[dict, dict]:
    """Per group, {(M, N): "best" | "≈ best"} and {(M, N): "≈ FP"} from :func:`close_calls`."""
    best, like_fp = {}, {}
    for call in close_calls(results):
        if call.within:  # a lone best with nothing close needs no mark
            best[call.group] = {(r.M, r.N): "≈ best" for r in call.within} | {(call.best.M, call.best.N): "best"}
        like_fp[call.group] = {(r.M, r.N): "≈ FP" for r in call.like_fp}
    return best, like_fp


def heatmap_figure(results: Sequence[ConfigResult], baselines: Mapping) -> Figure:
    """Per (dataset, model, variant) row: fine-tuned accuracy and gap to FP over M x N.

    The accuracy panels of one dataset share a colour scale (at least :data:`MIN_SPAN_PP` wide);
    all gap panels share one symmetric, diverging scale centred at 0.
    """
    rows = groups(results)
    by_group = {group: [r for r in results if r.group == group] for group in rows}
    acc_norms = {}
    for dataset in dict.fromkeys(group[0] for group in rows):
        members = [r for r in results if r.dataset == dataset]
        values = [r.mean("finetuned_acc") for r in members]
        span = max(MIN_SPAN_PP, SE_SPAN * _largest(r.mean("finetuned_acc_se") for r in members))
        acc_norms[dataset] = mcolors.Normalize(*span_limits([v for v in values if v is not None], span))
    gaps = [r.mean("gap_to_fp") for r in results if r.mean("gap_to_fp") is not None]
    gap_se = _largest(_difference_se(r.mean("fp_acc_se"), r.mean("finetuned_acc_se")) for r in results)
    gap_limits = symmetric_limits(gaps, max(MIN_SPAN_PP, SE_SPAN * gap_se))
    best_marks, fp_marks = _close_call_marks(results)

    fig = _new_figure(figsize=(13, 1.0 + 4.6 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (acc_ax, gap_ax), group in zip(axes, rows, strict=True):
        members = by_group[group]
        fp_acc = baselines.get(group[:2], (None, None))[0]
        fp_text = "" if fp_acc is None else f" (FP {fp_acc:.1f}%)"
        precision = _precision_text(members)
        _draw_heatmap(fig, acc_ax, members, "finetuned_acc", ACC_CMAP, acc_norms[group[0]],
                      f"{group_label(group)}: fine-tuned accuracy\n({precision})", "fine-tuned accuracy (%)",
                      best_marks.get(group))
        _draw_heatmap(fig, gap_ax, members, "gap_to_fp", GAP_CMAP, mcolors.Normalize(*gap_limits),
                      f"{group_label(group)}: gap to FP{fp_text}\n({precision})", "FP − fine-tuned (pp)",
                      fp_marks.get(group))
    std_text = "mean over seeds, ± sample std where ≥ 2 seeds" if _any_std(results) else "one seed each: no std"
    fig.suptitle(f"ABC-Net sweep: accuracy over M × N ({std_text})\n"
                 f"colour scales ≥ {MIN_SPAN_PP:g} pp and ≥ {SE_SPAN:g} standard errors wide; accuracy panels of one "
                 "dataset share one, gap panels one centred at 0 (white = as good as FP, red = below FP)\n"
                 "≈ best / ≈ FP: not distinguishable from the group's best cell / from FP "
                 "(within one s.e. of the difference)", fontsize=11)
    return fig


def plot_heatmaps(results: Sequence[ConfigResult], baselines: Mapping, path: Path) -> Figure:
    """Write ``accuracy_heatmap.png``; returns the figure."""
    fig = heatmap_figure(results, baselines)
    fig.savefig(path, dpi=120)
    return fig


# ---- accuracy vs size --------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledPoint:
    """A plotted point to label: data coordinates, its id text and colour."""

    x: float
    y: float
    text: str
    color: object


def _error_bar(r: ConfigResult, column: str) -> float | None:
    """± sample std over seeds with two or more seeds, else ± the binomial s.e. (None if unknown)."""
    stat = r.stats(column)
    if r.n_seeds >= 2 and stat and stat[1] is not None:
        return stat[1]
    return r.mean(f"{column}_se")


def _plot_stage(ax, results: Sequence[ConfigResult], column: str, color, marker: str, filled: bool,
                label: str) -> list[LabelledPoint]:
    """Accuracy of one stage (converted or fine-tuned) against ABC size, with error bars (see
    :func:`_error_bar`). Returns the points to label."""
    points = []
    for r in results:
        size, acc = r.stats("size_kb"), r.stats(column)
        if size and acc:
            points.append((size[0], acc[0], _error_bar(r, column), r.id))
    if not points:
        return []
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, markersize=8,
            markerfacecolor=color if filled else "none", linestyle="none", label=label, zorder=3)
    with_std = [p for p in points if p[2] is not None]
    if with_std:
        ax.errorbar([p[0] for p in with_std], [p[1] for p in with_std], yerr=[p[2] for p in with_std],
                    fmt="none", ecolor=color, capsize=3, elinewidth=1, zorder=2)
    return [LabelledPoint(x, y, ident, color) for x, y, _, ident in points]


def _join_equal_n(ax, results: Sequence[ConfigResult], color) -> None:
    """Join fine-tuned points of equal N, in order of size."""
    for n in {r.N for r in results}:
        line = sorted((r.mean("size_kb"), r.mean("finetuned_acc")) for r in results
                      if r.N == n and r.mean("size_kb") is not None and r.mean("finetuned_acc") is not None)
        if len(line) > 1:
            ax.plot(*zip(*line, strict=True), color=color, linewidth=1, alpha=0.4, zorder=1)


def _plot_paper_points(ax, points: Sequence[PaperPoint]) -> tuple[list[LabelledPoint], list[str]]:
    """The paper's FP line and ABC-Net points; returns the points to label and their key lines."""
    fp = next(p for p in points if p.M is None)
    ax.axhline(fp.top1, color="black", linestyle=":", linewidth=1.2, label=f"paper ResNet-18 FP top-1 ({fp.top1}%)")
    ax.plot([fp.size_kb], [fp.top1], marker="*", markersize=14, color="black", linestyle="none")
    abc = [p for p in points if p.M is not None]
    ax.plot([p.size_kb for p in abc], [p.top1 for p in abc], marker="D", color="black", markersize=6,
            linestyle="none", zorder=3, label="paper ABC-Net ResNet-18 top-1 (size ≈ M bits/weight)")
    labelled = [LabelledPoint(p.size_kb, p.top1, f"P{i}", "black") for i, p in enumerate(abc, start=1)]
    key = [f"P{i}: paper M={p.M} N={format_n(p.N)} ({p.top1}%)" for i, p in enumerate(abc, start=1)]
    return labelled, key


# Label offsets (points) tried in order: right, left, up, down, then the diagonals, further out.
_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1))
_RADII = (6, 12, 20, 30, 42, 56, 72)


def _text_box(anchor: np.ndarray, offset: tuple[float, float], size: tuple[float, float],
              direction: tuple[int, int]) -> Bbox:
    """Pixel box of a text of ``size`` placed at ``anchor + offset`` aligned away from the point."""
    width, height = size
    x = anchor[0] + offset[0] - {1: 0, 0: width / 2, -1: width}[direction[0]]
    y = anchor[1] + offset[1] - {1: 0, 0: height / 2, -1: height}[direction[1]]
    return Bbox.from_bounds(x, y, width, height)


def _overlap(box: Bbox, others: Sequence[Bbox]) -> float:
    total = 0.0
    for other in others:
        width = min(box.x1, other.x1) - max(box.x0, other.x0)
        height = min(box.y1, other.y1) - max(box.y0, other.y0)
        if width > 0 and height > 0:
            total += width * height
    return total


def place_labels(ax, points: Sequence[LabelledPoint], font_size: float = 8) -> list:
    """Annotate every point with its id where the text overlaps no other label, no marker and stays
    inside the axes (the nearest free spot around the point; a thin leader line when it had to move
    away). Needs the final axes layout: call after ``tight_layout`` and a draw."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72
    marker_half = 5 * px_per_pt
    anchors = [ax.transData.transform((p.x, p.y)) for p in points]
    obstacles = [Bbox.from_bounds(a[0] - marker_half, a[1] - marker_half, 2 * marker_half, 2 * marker_half)
                 for a in anchors]
    axes_box = ax.get_window_extent(renderer)
    pad = 1.5 * px_per_pt
    annotations = []
    for point, anchor in zip(points, anchors, strict=True):
        probe = ax.text(0, 0, point.text, fontsize=font_size)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        size = (extent.width + 2 * pad, extent.height + 2 * pad)
        best = None
        for radius in _RADII:
            for direction in _DIRECTIONS:
                scale = 0.7071 if all(direction) else 1.0
                offset = (direction[0] * radius * scale * px_per_pt, direction[1] * radius * scale * px_per_pt)
                box = _text_box(anchor, offset, size, direction)
                inside = (box.x0 >= axes_box.x0 and box.x1 <= axes_box.x1
                          and box.y0 >= axes_box.y0 and box.y1 <= axes_box.y1)
                cost = _overlap(box, obstacles) + (0 if inside else 1e9)
                if best is None or cost < best[0]:
                    best = (cost, radius, direction, offset, box)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, radius, direction, offset, box = best
        obstacles.append(box)
        arrow = {"arrowstyle": "-", "color": point.color, "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4}
        annotations.append(ax.annotate(
            point.text, (point.x, point.y), xytext=(offset[0] / px_per_pt, offset[1] / px_per_pt),
            textcoords="offset points", ha={1: "left", 0: "center", -1: "right"}[direction[0]],
            va={1: "bottom", 0: "center", -1: "top"}[direction[1]], fontsize=font_size, color=point.color,
            fontweight="bold", gid=LABEL_GID, arrowprops=arrow if radius > _RADII[0] else None, zorder=4))
    return annotations


def accuracy_vs_size_figure(results: Sequence[ConfigResult], baselines: Mapping) -> Figure:
    """Accuracy (converted: hollow squares, fine-tuned: filled circles) against ABC model size."""
    fig = _new_figure(figsize=(10, 6.5))
    ax = fig.subplots()
    palette = matplotlib.colormaps["tab10"].colors
    to_label: list[LabelledPoint] = []
    key_handles, key_labels, key_colors = [], [], []
    for index, group in enumerate(groups(results)):
        color = palette[index % len(palette)]
        members = [r for r in results if r.group == group]
        label = group_label(group)
        to_label += _plot_stage(ax, members, "converted_acc", color, "s", False, f"{label}: converted")
        to_label += _plot_stage(ax, members, "finetuned_acc", color, "o", True, f"{label}: fine-tuned")
        _join_equal_n(ax, members, color)
        fp_acc, fp_kb = baselines.get(group[:2], (None, None))
        if fp_acc is not None:
            ax.axhline(fp_acc, color=color, linestyle="--", linewidth=1.2,
                       label=f"{label}: FP baseline ({fp_acc:.1f}%)")
            if fp_kb is not None:
                ax.plot([fp_kb], [fp_acc], marker="*", markersize=14, color=color, linestyle="none")
        for r in members:
            key_handles.append(Line2D([], [], linestyle="none"))
            key_labels.append(f"{r.id}: M={_text(r.M)} N={format_n(r.N)}")
            key_colors.append(color)
        paper_points = paper_reference_points(*group[:2])
        if paper_points:
            labelled, key = _plot_paper_points(ax, paper_points)
            to_label += labelled
            key_handles += [Line2D([], [], linestyle="none") for _ in key]
            key_labels += key
            key_colors += ["black"] * len(key)
    sizes = [p.x for p in to_label] + [kb for _, kb in baselines.values() if kb is not None]
    sizes = [x for x in sizes if x > 0]
    wide = bool(sizes) and max(sizes) / min(sizes) >= 10  # a log axis only pays off over a decade or more
    ax.set_xscale("log" if wide else "linear")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if not wide:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(6))
    scale = "log scale; " if wide else ""
    ax.set_xlabel(f"model size (kB, {scale}★ = full-precision model)", fontsize=11)
    ax.set_ylabel("accuracy (%)", fontsize=11)
    bars = ("bars = ± sample std over seeds (≥ 2 seeds), else ± 1 s.e." if _any_std(results)
            else "bars = ± 1 standard error")
    ax.set_title(f"ABC-Net sweep: accuracy vs model size (mean over seeds; {bars})\n{_precision_text(results)}; "
                 "numbers = id in report.md; lines join fine-tuned points of equal N", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.08, y=0.15)
    handles, labels = ax.get_legend_handles_labels()
    legend = ax.legend(handles + key_handles, labels + key_labels, fontsize=8, loc="upper left",
                       bbox_to_anchor=(1.01, 1.0), ncol=1 if len(labels) + len(key_labels) <= 30 else 2,
                       handlelength=1.5)
    for text, color in zip(legend.get_texts()[len(labels):], key_colors, strict=True):
        text.set_color(color)  # the id's group, as on its points
    fig.tight_layout()
    fig.canvas.draw()
    place_labels(ax, to_label)
    return fig


def plot_accuracy_vs_size(results: Sequence[ConfigResult], baselines: Mapping, path: Path) -> Figure:
    """Write ``accuracy_vs_size.png``; returns the figure."""
    fig = accuracy_vs_size_figure(results, baselines)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
