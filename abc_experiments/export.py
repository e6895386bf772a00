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

from .data import DatasetUnavailableError
from .runs import RunError, evaluate_model, load_run, read_run, test_loader

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


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Pack, save, reload and evaluate the run's model; returns what export.json holds."""
    from .packed import get_isa, load_packed, pack_model, packed_layers, packed_size_report, save_packed

    run_dir = Path(run_dir)
    summary = read_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / EXPORT_DIR
    path = save_packed(pack_model(load_run(run_dir)), out_dir / MODEL_FILE, architecture=architecture_of(summary))
    packed = load_packed(path)  # evaluate what the file holds, not the model in memory
    loader, _ = test_loader(summary)
    result = evaluate_model(packed, loader)  # the packed engine computes in float32
    sizes = packed_size_report(path)
    report = {
        "run_dir": str(run_dir.absolute()), "file": str(path.absolute()),
        "model": summary.model, "dataset": summary.dataset, "M": summary.abc.M, "N": summary.abc.N,
        "abc_layers": dict(summary.abc.layers),  # the run's per-layer overrides (pattern -> {M, N})
        "layers": [{"name": name, "M": layer.M, "N": layer.N} for name, layer in packed_layers(packed)],
        "finetuned_acc": summary.finetuned.acc, "packed_acc": result["acc"], "packed_loss": result["loss"],
        "test_size": result["images"], "packed_images_per_s": result["images_per_s"], "kernel": get_isa(),
        **{key: sizes[key] for key in ("file_bytes", "fp32_bytes", "binary_weight_bytes", "float_bytes",
                                         "binary_weights", "bits_per_binary_weight", "ratio")},
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict) -> str:
    """The export report as aligned ``name  value`` lines for the console."""
    ms = sorted({layer["M"] for layer in report.get("layers", [])}) or [report["M"]]
    per_layer = f"M = {report['M']}" if len(ms) == 1 else f"M = {ms[0]}–{ms[-1]} by layer"
    rows = [
        ("fine-tuned accuracy (run)", f"{report['finetuned_acc']:.2f} %"),
        ("packed accuracy (file)", f"{report['packed_acc']:.2f} %  on {report['test_size']} test images"),
        ("file", f"{report['file_bytes']:,} bytes  ({report['file']})"),
        ("float32 weights", f"{report['fp32_bytes']:,} bytes  ({report['ratio']:.1f}x the file)"),
        ("bits per binary weight", f"{report['bits_per_binary_weight']:.3f}  ({per_layer})"),
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
    try:
        report = export_run(args.run_dir, args.out)
    except (RunError, DatasetUnavailableError, OSError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    print(format_report(report))
    if report["packed_acc"] != report["finetuned_acc"]:
        print(f"{PROG}: note: the packed model's accuracy differs from the run's; see {REPORT_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
