"""Fake sweep directories for the ``abc-report`` tests: no torch, no training, no network.

Two writers: :func:`write_finished_job` writes a plain dict like an older ``abc-run`` did (no
``test_size``, ``pid`` or ``fp_source``), :func:`write_typed_job` a current one through
:class:`abc_experiments.results.RunSummary`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import yaml

from abc_experiments.results import ABCSetting, RunSummary, SizeSummary, StageResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SE_HEADER = "± s.e."


def finetuned_acc(m: int, n: int, seed: int) -> float:
    """Deterministic fake accuracy: better with more bases, seed 1 is 1 point better."""
    return 90.0 + m + n / 2 + seed


def write_config(job_dir: Path, dataset: str, model: str, m: int, n: int | None, seed: int) -> None:
    """A Hydra-style ``.hydra/config.yaml`` (config groups as mappings with a ``name``)."""
    config = {
        "dataset": {"name": dataset, "batch_size": 64},
        "model": {"name": model},
        "abc": {"M": m, "N": n, "scope": "per_layer"},
        "seed": seed,
    }
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))


def write_finished_job(job_dir: Path, m: int, n: int | None, seed: int,
                       dataset: str = "digits", model: str = "seed_cnn", lr: float = 1e-3) -> None:
    """An older-style finished summary.json, written as a plain dict."""
    write_config(job_dir, dataset, model, m, n, seed)
    fp_acc, acc = 97.0 + seed, finetuned_acc(m, n or 0, seed)
    summary = {
        "status": "finished",
        "dataset": dataset, "model": model, "seed": seed,
        "abc": {"M": m, "N": n, "scope": "per_layer"},
        "fp": {"acc": fp_acc, "loss": 0.1, "val_acc": fp_acc, "val_loss": 0.1},
        "converted": {"acc": acc - 10, "loss": 0.4, "val_acc": acc - 10, "val_loss": 0.4},
        "finetuned": {"acc": acc, "loss": 0.2, "val_acc": acc, "val_loss": 0.2, "best_epoch": 1},
        "gaps": {"converted": fp_acc - acc + 10, "finetuned": fp_acc - acc},
        "size": {"fp_kb": 13000.0, "abc_kb": 500.0 * m, "compression": 26.0 / m,
                 "binary_mac_share": 0.95},
        "layers": [{"name": "conv2", "weight_error": 0.1, "activation_error": 0.2,
                    "binary_weights": 51200, "bits": 153696, "binary_macs": 1000}],
        "wall_time_s": {"pretrain": 10.0, "convert": 1.0, "finetune": 20.0, "total": 30.0 + seed},
        "run_dir": str(job_dir),
        "config": {"dataset": {"name": dataset}, "model": {"name": model}, "seed": seed,
                   "abc": {"M": m, "N": n}, "finetune": {"lr": lr}, "run_dir": str(job_dir)},
    }
    (job_dir / "summary.json").write_text(json.dumps(summary))


def stage(acc: float, test_size: int | None) -> StageResult:
    return StageResult(acc=acc, loss=0.3, val_acc=acc, val_loss=0.3, test_size=test_size, val_size=100)


def write_typed_job(job_dir: Path, m: int, n: int | None, seed: int, *, acc: float | None = None,
                    fp_acc: float = 97.0, converted_acc: float | None = None, test_size: int | None = 359,
                    dataset: str = "digits", model: str = "seed_cnn", status: str = "finished",
                    fp_source: str | None = "cache /c/fp.pt", pretrain_s: float = 0.1,
                    pid: int | None = None, host: str | None = None) -> RunSummary:
    """A current summary.json written by :meth:`RunSummary.write` (``n=None``: the config's null)."""
    acc = finetuned_acc(m, n or 0, seed) if acc is None else acc
    summary = RunSummary(
        dataset=dataset, model=model, seed=seed, abc=ABCSetting(M=m, N=n), run_dir=str(job_dir), status=status,
        config={"dataset": {"name": dataset}, "model": {"name": model}, "seed": seed,
                "abc": {"M": m, "N": n}, "finetune": {"lr": 0.001}, "run_dir": str(job_dir)},
        fp_source=fp_source, pretrain_cache="/c/fp.pt", pid=pid, host=host,
        size=SizeSummary(fp_kb=13000.0, abc_kb=500.0 * m, compression=26.0 / m),
        wall_time_s={"pretrain": pretrain_s, "convert": 2.0, "finetune": 30.0,
                     "total": pretrain_s + 32.0},
    )
    summary.set_stage("fp", stage(fp_acc, test_size))
    if status == "finished":
        summary.set_stage("converted", stage(acc - 10 if converted_acc is None else converted_acc, test_size))
        summary.set_stage("finetuned", stage(acc, test_size))
    summary.write(job_dir / "summary.json")
    return summary


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def table_rows(markdown: str, section: str) -> list[dict[str, str]]:
    """Rows of the first Markdown table after ``## <section>``, as ``{header: cell}``; a ``± s.e.``
    column is keyed ``"<the column before it> ± s.e."``."""
    lines = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines if line.startswith("| ")]
    header = []
    for name in rows[0]:
        header.append(f"{header[-1]} {SE_HEADER}" if name == SE_HEADER else name)
    return [dict(zip(header, row, strict=True)) for row in rows[2:]]


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
