"""``abc-export RUN_DIR``: a finished run's fine-tuned ABC model as a bit-packed file, checked.

Writes ``RUN_DIR/export/model.abc.safetensors`` (weight bases as bits, everything else as float
tensors, the metadata to rebuild the model in the safetensors header: no pickle) and
``RUN_DIR/export/export.json``, after loading the file back and evaluating the packed model on the
run's own test split next to the run's fine-tuned accuracy. Each packed layer keeps its own M and N
(per-layer precision, ``abc.layers``): ``export.json`` lists them as the loaded file has them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .runs import RunError, read_run

PROG = "abc-export"
EXPORT_DIR = "export"
MODEL_FILE = "model.abc.safetensors"
REPORT_FILE = "export.json"


def architecture_of(summary) -> dict:
    """What ``load_packed`` needs to rebuild the run's float architecture."""
    channels, size, _ = summary.input_shape
    return {"name": summary.model, "in_channels": channels, "image_size": size,
            "num_classes": summary.num_classes, "options": dict(summary.config["model"].get("options", {})),
            "input_shape": list(summary.input_shape), "dataset": summary.dataset}


def _one_or_all(values: list):
    """A file's distinct per-layer values: the value if all layers share it, else the sorted list."""
    return values[0] if len(values) == 1 else values


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Pack, save, reload and evaluate the run's model; returns what export.json holds.

    Args:
        run_dir: the finished run.
        out_dir: where the two files go (default ``RUN_DIR/export``).

    Returns:
        The report written to ``export.json``: what the model file beside it holds (M, N, model,
        dataset and sizes read back from the file, not from the run's summary), its accuracy on
        the run's test split, and the run's own fine-tuned accuracy.

    Both files are written atomically, the report last; an ``export.json`` of an earlier export is
    removed before the new model file is written, so a report never sits beside a file that it
    does not describe (an interrupted export leaves the model file without a report).
    """
    from .checkpoints import atomic_write, atomic_write_text
    from .packed import get_isa, load_packed, pack_model, packed_layers, packed_size_report, read_packed, save_packed
    from .runs import evaluate_model, load_run, test_loader

    run_dir = Path(run_dir)
    summary = read_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / EXPORT_DIR
    path, report_path = out_dir / MODEL_FILE, out_dir / REPORT_FILE
    packed_model = pack_model(load_run(run_dir))
    report_path.unlink(missing_ok=True)  # from here on, no report describes the file
    with atomic_write(path) as tmp:
        save_packed(packed_model, tmp, architecture=architecture_of(summary))
    _, meta = read_packed(path)
    packed = load_packed(path)  # evaluate what the file holds, not the model in memory
    loader, _ = test_loader(summary)
    result = evaluate_model(packed, loader)  # the packed engine computes in float32
    sizes = packed_size_report(path)
    architecture = meta.get("architecture") or {}
    report = {
        "run_dir": str(run_dir.absolute()), "file": str(path.absolute()),
        "model": architecture.get("name"), "dataset": architecture.get("dataset"),
        "M": _one_or_all(meta["M"]), "N": _one_or_all(meta["N"]),
        "abc_layers": dict(summary.abc.layers or {}),  # the run's per-layer overrides (pattern -> {M, N})
        "layers": [{"name": name, "M": layer.M, "N": layer.N} for name, layer in packed_layers(packed)],
        "finetuned_acc": summary.finetuned.acc, "packed_acc": result["acc"], "packed_loss": result["loss"],
        "test_size": result["images"], "packed_images_per_s": result["images_per_s"], "kernel": get_isa(),
        **{key: sizes[key] for key in ("file_bytes", "fp32_bytes", "binary_weight_bytes", "float_bytes",
                                         "binary_weights", "bits_per_binary_weight", "ratio")},
    }
    atomic_write_text(json.dumps(report, indent=2) + "\n", report_path)  # last: the file is complete
    return report


def format_report(report: dict) -> str:
    """The export report as aligned ``name  value`` lines for the console."""
    ms = sorted({layer["M"] for layer in report.get("layers", [])})
    if len(ms) > 1:
        M = f"{ms[0]}–{ms[-1]} by layer"
    else:
        M = ", ".join(map(str, report["M"])) if isinstance(report["M"], list) else report["M"]
    rows = [
        ("fine-tuned accuracy (run)", f"{report['finetuned_acc']:.2f} %"),
        ("packed accuracy (file)", f"{report['packed_acc']:.2f} %  on {report['test_size']} test images"),
        ("file", f"{report['file_bytes']:,} bytes  ({report['file']})"),
        ("float32 weights", f"{report['fp32_bytes']:,} bytes  ({report['ratio']:.1f}x the file)"),
        ("bits per binary weight", f"{report['bits_per_binary_weight']:.3f}  (M = {M} in the file)"),
        ("binary kernel", f"{report['kernel']}  ({report['packed_images_per_s']:.0f} images/s)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Export a finished abc-run's fine-tuned ABC model to a bit-packed, pickle-free "
                               "file (RUN_DIR/export/model.abc.safetensors) and check it on the run's test split.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    try:  # before importing torch: a folder that is no finished run is refused at once
        read_run(args.run_dir)
    except RunError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    from .checkpoints import CheckpointError
    from .data import DatasetUnavailableError
    from .packed import PackedFormatError

    try:
        report = export_run(args.run_dir, args.out)
    except (RunError, DatasetUnavailableError, CheckpointError, PackedFormatError, OSError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    print(format_report(report))
    if report["packed_acc"] != report["finetuned_acc"]:
        print(f"{PROG}: note: the packed model's accuracy differs from the run's; see {REPORT_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
