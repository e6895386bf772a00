"""Tests for ``abc-report`` on fake sweep directories (no torch, no training)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from abc_experiments import report

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OUTPUT_FILES = ("report.md", "report.csv", "accuracy_heatmap.png", "accuracy_vs_size.png")


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


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 x 2 (M in {1, 3}, N in {FP, 3}) grid with seeds 0 and 1, one failed, one unfinished job."""
    sweep_dir = tmp_path / "multirun" / "2024-01-01" / "12-00-00"
    index = 0
    for m in (3, 1):
        for n in (3, 0):
            for seed in (0, 1):
                write_finished_job(sweep_dir / str(index), m, n, seed)
                index += 1
    failed_dir = sweep_dir / str(index)
    write_config(failed_dir, "digits", "seed_cnn", 5, 5, 0)
    (failed_dir / "summary.json").write_text(json.dumps({
        "status": "failed", "error": "RuntimeError: CUDA out of memory\nTraceback ...",
        "dataset": "digits", "model": "seed_cnn", "abc": {"M": 5, "N": 5}, "seed": 0,
    }))
    write_config(sweep_dir / str(index + 1), "digits", "seed_cnn", 5, 1, 1)
    (sweep_dir / "0" / "tb").mkdir()  # TensorBoard logs are not jobs
    return sweep_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def table_rows(markdown: str, section: str) -> list[list[str]]:
    """Data rows (cells) of the first Markdown table after the ``## <section>`` heading."""
    lines = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in lines if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_report_files_and_tables(sweep: Path, capsys) -> None:
    assert report.main([str(sweep)]) == 0

    for name in OUTPUT_FILES:
        assert (sweep / name).is_file()
    markdown = (sweep / "report.md").read_text()
    rows = table_rows(markdown, "Results")
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("digits", "seed_cnn", "1", "FP"), ("digits", "seed_cnn", "1", "3"),
        ("digits", "seed_cnn", "3", "FP"), ("digits", "seed_cnn", "3", "3"),
    ]
    m3n3 = rows[3]
    assert m3n3[4] == "2 (0, 1)"
    std = statistics.stdev([finetuned_acc(3, 3, 0), finetuned_acc(3, 3, 1)])
    assert m3n3[5] == f"97.50 ± {std:.2f}"  # fp_acc: 97 and 98
    assert m3n3[7] == f"95.00 ± {std:.2f}"  # finetuned_acc: 94.5 and 95.5
    assert m3n3[8] == "2.50 ± 0.00"  # gap_to_fp
    assert m3n3[9] == "1500.0 ± 0.0"  # size_kb

    out = capsys.readouterr().out
    assert "| digits | seed_cnn | 3 | 3 | 2 (0, 1) |" in out
    assert str(sweep / "accuracy_heatmap.png") in out


def test_report_csv(sweep: Path) -> None:
    report.main([str(sweep)])
    rows = read_csv(sweep / "report.csv")
    assert list(rows[0]) == [
        "dataset", "model", "variant", "M", "N", "n_seeds", "seeds",
        "fp_acc_mean", "fp_acc_std", "converted_acc_mean", "converted_acc_std",
        "finetuned_acc_mean", "finetuned_acc_std", "gap_to_fp_mean", "gap_to_fp_std",
        "size_kb_mean", "size_kb_std", "compression_mean", "compression_std",
        "wall_time_s_mean", "wall_time_s_std",
    ]
    assert [(r["M"], r["N"]) for r in rows] == [("1", "0"), ("1", "3"), ("3", "0"), ("3", "3")]
    m1_fp = rows[0]
    assert (m1_fp["n_seeds"], m1_fp["seeds"]) == ("2", "0;1")
    assert float(m1_fp["finetuned_acc_mean"]) == pytest.approx(91.5)
    expected_std = statistics.stdev([91.0, 92.0])
    assert float(m1_fp["finetuned_acc_std"]) == pytest.approx(expected_std, abs=1e-4)
    assert float(m1_fp["converted_acc_mean"]) == pytest.approx(81.5)
    assert float(m1_fp["wall_time_s_mean"]) == pytest.approx(30.5)
    assert float(m1_fp["size_kb_mean"]) == pytest.approx(500.0)
    assert float(m1_fp["compression_mean"]) == pytest.approx(26.0)


def test_failed_and_unfinished_jobs_are_listed(sweep: Path) -> None:
    report.main([str(sweep)])
    rows = table_rows((sweep / "report.md").read_text(), "Failed or unfinished jobs")
    assert [(r[0], r[1], r[4], r[5]) for r in rows] == [
        ("`8`", "failed", "5", "5"), ("`9`", "unfinished", "5", "1"),
    ]
    assert rows[0][7] == "RuntimeError: CUDA out of memory"
    assert "no summary.json" in rows[1][7]
    assert rows[1][2:4] == ["digits", "seed_cnn"]  # read from .hydra/config.yaml


def test_plots_are_valid_png(sweep: Path) -> None:
    report.main([str(sweep)])
    assert_valid_png(sweep / "accuracy_heatmap.png")
    assert_valid_png(sweep / "accuracy_vs_size.png")


def test_whole_outputs_tree_with_several_pairs(tmp_path: Path) -> None:
    write_finished_job(tmp_path / "multirun" / "a" / "0", 1, 1, 0)
    write_finished_job(tmp_path / "multirun" / "b" / "0", 3, None, 0, "imagenet", "resnet18")
    write_finished_job(tmp_path / "cache" / "0", 2, 2, 0)  # top-level cache is not scanned
    assert report.main([str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "report.csv")
    assert [(r["dataset"], r["M"], r["N"], r["finetuned_acc_std"]) for r in rows] == [
        ("digits", "1", "1", ""), ("imagenet", "3", "0", ""),
    ]
    assert_valid_png(tmp_path / "accuracy_heatmap.png")
    assert_valid_png(tmp_path / "accuracy_vs_size.png")


def test_empty_dir(tmp_path: Path, capsys) -> None:
    assert report.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"abc-report: no jobs found under {tmp_path}")
    assert "abc-run -m" in err
    assert not (tmp_path / "report.md").exists()


def test_only_failed_jobs(tmp_path: Path, capsys) -> None:
    write_config(tmp_path / "0", "digits", "seed_cnn", 1, 1, 0)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "summary.json").write_text('{"status": "failed", "error": "boom"}')
    assert report.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no finished jobs" in err and "found 2 failed/unfinished" in err
    rows = table_rows((tmp_path / "report.md").read_text(), "Failed or unfinished jobs")
    assert [(r[0], r[1], r[7]) for r in rows][1] == ("`1`", "failed", "boom")
    assert not (tmp_path / "accuracy_heatmap.png").exists()


def test_unreadable_summary_is_listed(sweep: Path) -> None:
    (sweep / "9" / "summary.json").write_text("{not json")
    assert report.main([str(sweep)]) == 0
    rows = table_rows((sweep / "report.md").read_text(), "Failed or unfinished jobs")
    assert rows[1][:2] == ["`9`", "unreadable"]


def test_missing_dir(tmp_path: Path, capsys) -> None:
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    assert report.main([str(a_file)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_paper_reference_points() -> None:
    assert report.paper_reference_points("digits", "seed_cnn") == []
    assert report.paper_reference_points("imagenet", "resnet50") == []
    assert report.paper_reference_points("cifar10", "resnet18") == []
    points = report.paper_reference_points("imagenet", "resnet18")
    by_bases = {(p.M, p.N): p.top1 for p in points}
    assert by_bases[(None, None)] == 69.3
    assert by_bases[(3, 3)] == 61.0 and by_bases[(5, 5)] == 65.0 and by_bases[(1, 1)] == 42.7
    assert len(points) == 8
    assert report.paper_reference_points("ImageNet", "ResNet-18") == points


def test_module_entry_point(sweep: Path) -> None:
    python_path = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path)}
    done = subprocess.run([sys.executable, "-m", "abc_experiments.report", str(sweep)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| digits | seed_cnn | 1 | FP | 2 (0, 1) |" in done.stdout
    assert (sweep / "report.md").is_file()

    missing = subprocess.run([sys.executable, "-m", "abc_experiments.report", str(sweep / "nope")],
                             capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr


def test_settings_that_vary_besides_seed_are_separate_rows(tmp_path):
    """A sweep over finetune.lr must not be averaged as if its jobs were seeds of one config."""
    for index, (lr, seed) in enumerate([(1e-3, 0), (1e-3, 1), (1e-2, 0)]):
        write_finished_job(tmp_path / str(index), 3, 3, seed, lr=lr)
    assert report.main([str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert sorted((r["variant"], r["n_seeds"]) for r in rows) == [("finetune.lr=0.001", "2"),
                                                                   ("finetune.lr=0.01", "1")]
    assert "| variant |" in (tmp_path / "report.md").read_text()
