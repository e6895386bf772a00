"""Tests for ``abc-report`` on fake sweep directories (no torch, no training, no network)."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.collections import LineCollection
from matplotlib.text import Text
from report_helpers import (
    assert_valid_png,
    finetuned_acc,
    read_csv,
    table_rows,
    write_config,
    write_finished_job,
    write_typed_job,
)

from abc_experiments import report
from abc_experiments.report import plots

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("report.md", "report.csv", "accuracy_heatmap.png", "accuracy_vs_size.png")


def se(acc: float, n: int) -> float:
    return 100 * math.sqrt(acc / 100 * (1 - acc / 100) / n)


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


@pytest.fixture
def typed_sweep(tmp_path: Path) -> Path:
    """Current summaries (test_size 359, fp_source): M in {1, 3} x N in {FP, 3}, seeds 0 and 1;
    the job of seed 0 at M=1, N=FP trained the shared FP model (100 s), the others reused it."""
    index = 0
    for m, n, seed in itertools.product((1, 3), (None, 3), (0, 1)):
        trained = index == 0
        write_typed_job(tmp_path / str(index), m, n, seed, fp_source="trained" if trained else "cache /c/fp.pt",
                        pretrain_s=100.0 if trained else 0.2)
        index += 1
    return tmp_path


def test_report_files_and_tables(sweep: Path, capsys) -> None:
    assert report.main([str(sweep)]) == 0

    for name in OUTPUT_FILES:
        assert (sweep / name).is_file()
    markdown = (sweep / "report.md").read_text()
    rows = table_rows(markdown, "Results")
    assert [(r["dataset"], r["model"], r["M"], r["N"]) for r in rows] == [
        ("digits", "seed_cnn", "1", "FP"), ("digits", "seed_cnn", "1", "3"),
        ("digits", "seed_cnn", "3", "FP"), ("digits", "seed_cnn", "3", "3"),
    ]
    assert [r["id"] for r in rows] == ["1", "2", "3", "4"]
    m3n3 = rows[3]
    assert m3n3["seeds"] == "2 (0, 1)"
    std = statistics.stdev([finetuned_acc(3, 3, 0), finetuned_acc(3, 3, 1)])
    assert m3n3["fp_acc (%)"] == f"97.50 ± {std:.2f}"  # fp_acc: 97 and 98
    assert m3n3["finetuned_acc (%)"] == f"95.00 ± {std:.2f}"  # finetuned_acc: 94.5 and 95.5
    assert m3n3["gap_to_fp (pp)"] == "2.50 ± 0.00"
    assert m3n3["size_kb"] == "1500.0 ± 0.0"
    assert m3n3["own_time_s"] == "21.0 ± 0.0"  # convert + finetune, not the shared pretraining
    # older summaries: no test-set size, so no standard error
    assert m3n3["test n"] == "–" and m3n3["finetuned_acc (%) ± s.e."] == "–"
    assert "do not record their test-set size" in markdown

    out = capsys.readouterr().out
    assert "| digits | seed_cnn | 3 | 3 | 2 (0, 1) |" in out
    assert str(sweep / "accuracy_heatmap.png") in out


def test_report_csv(sweep: Path) -> None:
    report.main([str(sweep)])
    rows = read_csv(sweep / "report.csv")
    assert list(rows[0]) == [
        "id", "dataset", "model", "variant", "M", "N", "n_seeds", "seeds", "test_n",
        "fp_acc_mean", "fp_acc_std", "fp_acc_se", "converted_acc_mean", "converted_acc_std", "converted_acc_se",
        "finetuned_acc_mean", "finetuned_acc_std", "finetuned_acc_se", "gap_to_fp_mean", "gap_to_fp_std",
        "size_kb_mean", "size_kb_std", "compression_mean", "compression_std", "own_time_s_mean", "own_time_s_std",
    ]
    assert [(r["M"], r["N"]) for r in rows] == [("1", "0"), ("1", "3"), ("3", "0"), ("3", "3")]
    m1_fp = rows[0]
    assert (m1_fp["n_seeds"], m1_fp["seeds"]) == ("2", "0;1")
    assert float(m1_fp["finetuned_acc_mean"]) == pytest.approx(91.5)
    expected_std = statistics.stdev([91.0, 92.0])
    assert float(m1_fp["finetuned_acc_std"]) == pytest.approx(expected_std, abs=1e-4)
    assert float(m1_fp["converted_acc_mean"]) == pytest.approx(81.5)
    assert float(m1_fp["own_time_s_mean"]) == pytest.approx(21.0)
    assert float(m1_fp["size_kb_mean"]) == pytest.approx(500.0)
    assert float(m1_fp["compression_mean"]) == pytest.approx(26.0)
    assert m1_fp["test_n"] == "" and m1_fp["finetuned_acc_se"] == ""


def test_failed_and_unfinished_jobs_are_listed(sweep: Path) -> None:
    report.main([str(sweep)])
    rows = table_rows((sweep / "report.md").read_text(), "Failed or unfinished jobs")
    assert [(r["dir"], r["status"], r["M"], r["N"]) for r in rows] == [
        ("`8`", "failed", "5", "5"), ("`9`", "unfinished", "5", "1"),
    ]
    assert rows[0]["error"] == "RuntimeError: CUDA out of memory"
    assert "no summary.json" in rows[1]["error"]
    assert (rows[1]["dataset"], rows[1]["model"]) == ("digits", "seed_cnn")  # from .hydra/config.yaml


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
    assert (rows[1]["dir"], rows[1]["status"], rows[1]["error"]) == ("`1`", "failed", "boom")
    assert not (tmp_path / "accuracy_heatmap.png").exists()


def test_unreadable_summary_is_listed(sweep: Path) -> None:
    (sweep / "9" / "summary.json").write_text("{not json")
    assert report.main([str(sweep)]) == 0
    rows = table_rows((sweep / "report.md").read_text(), "Failed or unfinished jobs")
    assert (rows[1]["dir"], rows[1]["status"]) == ("`9`", "unreadable")


def test_partial_old_summary_still_reads(tmp_path: Path) -> None:
    """A stage record missing figures, and no status/wall times: shown with "–", not dropped."""
    write_finished_job(tmp_path / "0", 2, 2, 0)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "summary.json").write_text(json.dumps({
        "status": "finished", "dataset": "digits", "model": "seed_cnn", "seed": 1, "abc": {"M": 2, "N": 2},
        "fp": {"acc": 96.0}, "finetuned": {"acc": 93.0}}))
    assert report.main([str(tmp_path)]) == 0
    [row] = table_rows((tmp_path / "report.md").read_text(), "Results")
    assert row["seeds"] == "2 (0, 1)"
    assert row["converted_acc (%)"] == "83.00"  # only job 0 has it


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


def test_importing_the_report_loads_no_torch() -> None:
    """abc-report stays light: no torch, and matplotlib only once a plot is drawn."""
    code = ("import sys, abc_experiments.report as r; r.compact_table(sys.argv[1]); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'hydra') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT / "nonexistent")], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_settings_that_vary_besides_seed_are_separate_rows(tmp_path):
    """A sweep over finetune.lr must not be averaged as if its jobs were seeds of one config."""
    for index, (lr, seed) in enumerate([(1e-3, 0), (1e-3, 1), (1e-2, 0)]):
        write_finished_job(tmp_path / str(index), 3, 3, seed, lr=lr)
    assert report.main([str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "report.csv")
    assert sorted((r["variant"], r["n_seeds"]) for r in rows) == [("finetune.lr=0.001", "2"),
                                                                   ("finetune.lr=0.01", "1")]
    assert "| variant |" in (tmp_path / "report.md").read_text()


# ---- test-set size and standard errors ----------------------------------------------------------


def test_report_states_test_size_and_standard_errors(typed_sweep: Path) -> None:
    assert report.main([str(typed_sweep)]) == 0
    markdown = (typed_sweep / "report.md").read_text()
    assert "test set: 359 images" in markdown
    rows = {(r["M"], r["N"]): r for r in table_rows(markdown, "Results")}
    m3n3 = rows[("3", "3")]
    assert m3n3["test n"] == "359"
    expected = statistics.fmean([se(finetuned_acc(3, 3, 0), 359), se(finetuned_acc(3, 3, 1), 359)])
    assert m3n3["finetuned_acc (%) ± s.e."] == f"{expected:.2f}"
    assert m3n3["fp_acc (%) ± s.e."] == f"{se(97.0, 359):.2f}"
    assert float(read_csv(typed_sweep / "report.csv")[3]["finetuned_acc_se"]) == pytest.approx(expected, abs=1e-3)
    # M=3 N=3 (95.0) and M=3 N=FP (93.5) differ by less than √2·s.e. (≈ 1.65 pp at n = 359); M=1 N=FP
    # (91.5) is more than that behind
    section = markdown.split("## Test-set size and standard errors\n", 1)[1].split("\n## ", 1)[0]
    assert "within the standard error of M=3 N=FP (id 3" in section
    assert "M=1 N=FP (id 1" not in section.split("within the standard error of", 1)[1].split(":")[0]
    assert "not significant" in section


def test_gap_within_standard_error_of_fp_is_reported(tmp_path: Path) -> None:
    write_typed_job(tmp_path / "0", 3, 3, 0, fp_acc=97.0, acc=96.5, test_size=359)
    write_typed_job(tmp_path / "1", 1, 1, 0, fp_acc=97.0, acc=80.0, test_size=359)
    assert report.main([str(tmp_path)]) == 0
    markdown = (tmp_path / "report.md").read_text()
    assert "the gap to full precision is within the standard error for M=3 N=3 (id 2)." in markdown


# ---- N = null and N = 0 ----------------------------------------------------------------------


def test_n_null_and_n_zero_are_one_configuration_and_duplicates_count_once(tmp_path: Path) -> None:
    """``abc.N=null`` and ``abc.N=0`` are the same setting: one row; the same seed twice is a
    duplicate job, not a second seed."""
    write_typed_job(tmp_path / "abc.N=null,seed=0", 2, None, 0, acc=90.0)
    write_typed_job(tmp_path / "abc.N=0,seed=0", 2, 0, 0, acc=91.0)
    write_typed_job(tmp_path / "abc.N=0,seed=1", 2, 0, 1, acc=92.0)
    write_typed_job(tmp_path / "abc.N=null,seed=1", 2, None, 1, acc=92.5)
    assert report.main([str(tmp_path)]) == 0
    markdown = (tmp_path / "report.md").read_text()
    [row] = table_rows(markdown, "Results")
    assert (row["M"], row["N"], row["seeds"]) == ("2", "FP", "2 (0, 1)")
    # the first job of each seed (directory order) counts: abc.N=0,seed=0 (91) and abc.N=0,seed=1 (92)
    assert row["finetuned_acc (%)"] == f"91.50 ± {statistics.stdev([91.0, 92.0]):.2f}"
    duplicates = table_rows(markdown, "Duplicate jobs")
    assert [(d["dir"], d["duplicate of"], d["seed"]) for d in duplicates] == [
        ("`abc.N=null,seed=0`", "`abc.N=0,seed=0`", "0"), ("`abc.N=null,seed=1`", "`abc.N=0,seed=1`", "1")]
    assert "2 duplicate(s) left out" in markdown
    [csv_row] = read_csv(tmp_path / "report.csv")
    assert (csv_row["N"], csv_row["n_seeds"], csv_row["seeds"]) == ("0", "2", "0;1")


def test_n_null_seed_0_and_n_zero_seed_1_are_two_seeds(tmp_path: Path) -> None:
    write_typed_job(tmp_path / "a", 2, None, 0)
    write_typed_job(tmp_path / "b", 2, 0, 1)
    results = report.aggregate(report.collect_jobs(tmp_path))
    assert [(r.N, sorted(r.seeds)) for r in results] == [(0, [0, 1])]


# ---- status --------------------------------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_running_summary_of_a_killed_process_shows_interrupted(tmp_path: Path) -> None:
    write_typed_job(tmp_path / "done", 2, 2, 0)
    write_typed_job(tmp_path / "killed", 3, 3, 0, status="running", pid=dead_pid(), host=socket.gethostname())
    write_typed_job(tmp_path / "alive", 1, 1, 0, status="running", pid=os.getpid(), host=socket.gethostname())
    assert report.main([str(tmp_path)]) == 0
    rows = {r["dir"]: r for r in table_rows((tmp_path / "report.md").read_text(), "Failed or unfinished jobs")}
    assert rows["`killed`"]["status"] == "interrupted"
    assert "is gone" in rows["`killed`"]["error"]
    assert rows["`alive`"]["status"] == "running"
    table = report.compact_table(tmp_path)
    assert [line.split()[4] for line in table.splitlines()[1:]] == ["running", "finished", "interrupted"]


# ---- compact table -----------------------------------------------------------------------------


def test_compact_table(typed_sweep: Path) -> None:
    write_typed_job(typed_sweep / "8", 3, 0, 1)  # a duplicate of job 5 (M=3, N=FP, seed 1)
    table = report.compact_table(typed_sweep)
    lines = table.splitlines()
    assert lines[0].split() == ["job", "M", "N", "seed", "status", "FP", "%", "converted", "%", "fine-tuned", "%"]
    assert len(lines) == 10
    assert lines[1].split() == ["0", "1", "FP", "0", "finished", "97.00", "81.00", "91.00"]
    assert lines[-1].split()[-3:] == ["duplicate", "of", "5"]
    some = report.compact_table([typed_sweep / "0", typed_sweep / "7"])
    assert [line.split()[0] for line in some.splitlines()[1:]] == ["0", "7"]
    assert report.compact_table(typed_sweep / "missing") == ""


# ---- time ------------------------------------------------------------------------------------------


def test_shared_pretraining_is_shown_once(typed_sweep: Path) -> None:
    assert report.main([str(typed_sweep)]) == 0
    markdown = (typed_sweep / "report.md").read_text()
    assert markdown.count("Pretraining (shared): 100.0 s") == 1
    [pretrained] = table_rows(markdown, "Time")
    assert (pretrained["trained by"], pretrained["pretrain (shared) s"], pretrained["reused by (jobs)"]) == (
        "`0`", "100.0", "7")
    rows = table_rows(markdown, "Results")
    assert {r["own_time_s"] for r in rows} == {"32.0 ± 0.0"}  # convert 2 + finetune 30


# ---- figures ---------------------------------------------------------------------------------------


def results_for(tmp_path: Path):
    jobs = report.collect_jobs(tmp_path)
    return report.aggregate(jobs), report.fp_baselines(jobs)


def test_heatmap_colour_scales_are_shared_and_the_gap_scale_centred(tmp_path: Path) -> None:
    """Two models on one dataset: their accuracy panels share one scale; gap panels share one
    scale symmetric about 0; a spread of 0.3 pp spans four standard errors (359 test images), or
    the minimum 2 pp when the standard error is tiny; cells within the s.e. of the best say so."""
    for index, (model, m, acc) in enumerate([("cnn_a", 1, 90.0), ("cnn_a", 3, 90.3),
                                             ("cnn_b", 1, 80.0), ("cnn_b", 3, 85.0)]):
        write_typed_job(tmp_path / str(index), m, 3, 0, model=model, acc=acc, fp_acc=95.0 if m == 1 else 88.0)
    results, baselines = results_for(tmp_path)
    fig = report.heatmap_figure(results, baselines)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    acc_norms = [panels[0].images[0].norm, panels[2].images[0].norm]
    gap_norms = [panels[1].images[0].norm, panels[3].images[0].norm]
    assert acc_norms[0].vmin == acc_norms[1].vmin == 80.0 and acc_norms[0].vmax == acc_norms[1].vmax == 90.3
    assert gap_norms[0].vmin == gap_norms[1].vmin == -gap_norms[0].vmax == -15.0
    assert gap_norms[0](0.0) == pytest.approx(0.5)
    assert plots.GAP_CMAP in {ax.images[0].get_cmap().name.removesuffix("_r") + "_r" for ax in panels[1::2]}
    assert "test set: 359 images" in panels[0].get_title()

    narrow = report.heatmap_figure(results[:2], baselines)
    acc_panel = [ax for ax in narrow.axes if ax.images][0]
    norm = acc_panel.images[0].norm
    largest_se = max(100 * (p * (1 - p) / 359) ** 0.5 for p in (0.900, 0.903))  # about 1.58 pp
    assert norm.vmax - norm.vmin == pytest.approx(plots.SE_SPAN * largest_se)
    assert norm.vmin < 90.0 and norm.vmax > 90.3
    cells = sorted(t.get_text() for t in acc_panel.texts)
    assert cells == ["90.00\n≈ best", "90.30\nbest"]  # 0.3 pp apart, s.e. of the difference 2.2 pp
    assert "≈ best" in narrow.get_suptitle()

    precise = tmp_path / "precise"
    for index, (m, acc) in enumerate([(1, 90.0), (3, 90.3)]):
        write_typed_job(precise / str(index), m, 3, 0, acc=acc, fp_acc=95.0, test_size=1_000_000)
    fig = report.heatmap_figure(*results_for(precise))
    acc_panel = [ax for ax in fig.axes if ax.images][0]
    norm = acc_panel.images[0].norm
    assert norm.vmax - norm.vmin == pytest.approx(plots.MIN_SPAN_PP)
    assert not any("best" in t.get_text() for t in acc_panel.texts)  # 0.3 pp is 10 s.e. here


def errorbars(fig) -> list:
    ax = fig.axes[0]
    return [c for c in ax.collections if isinstance(c, LineCollection) and c.get_segments()]


def test_std_shown_only_with_two_or_more_seeds(tmp_path: Path) -> None:
    one = tmp_path / "one"
    for index, m in enumerate((1, 3)):
        write_typed_job(one / str(index), m, 3, 0)
    results, baselines = results_for(one)
    size_fig = report.accuracy_vs_size_figure(results, baselines)
    ses = [r.mean("finetuned_acc_se") for r in results]
    bars = errorbars(size_fig)
    assert len(bars) == 2 and all(len(c.get_segments()) == 2 for c in bars)  # converted, fine-tuned: ± 1 s.e.
    heights = sorted(abs(seg[1][1] - seg[0][1]) / 2 for seg in bars[1].get_segments())
    assert heights == pytest.approx(sorted(ses))
    assert "std" not in size_fig.axes[0].get_title() and "± 1 standard error" in size_fig.axes[0].get_title()
    heat = report.heatmap_figure(results, baselines)
    assert "± sample std" not in heat.get_suptitle() and "no std" in heat.get_suptitle()
    assert not any("±" in t.get_text() for ax in heat.axes for t in ax.texts)

    two = tmp_path / "two"
    for index, (m, seed) in enumerate([(1, 0), (1, 1), (3, 0)]):
        write_typed_job(two / str(index), m, 3, seed)
    results, baselines = results_for(two)
    size_fig = report.accuracy_vs_size_figure(results, baselines)
    assert len(errorbars(size_fig)) == 2  # converted and fine-tuned: std for M=1, s.e. for M=3
    assert all(len(c.get_segments()) == 2 for c in errorbars(size_fig))
    assert "bars = ± sample std over seeds (≥ 2 seeds), else ± 1 s.e." in size_fig.axes[0].get_title()
    heat = report.heatmap_figure(results, baselines)
    assert "± sample std" in heat.get_suptitle()
    assert sum("±" in t.get_text() for ax in heat.axes for t in ax.texts) == 2  # accuracy and gap, M=1


def test_size_plot_labels_every_point_without_collisions(tmp_path: Path) -> None:
    """Crowded: M=3 with N in {FP, 1, 2, 3} share one size and lie within 0.3 pp, converted
    points too; every point (converted and fine-tuned) gets an id label, none overlap."""
    index = 0
    for m in (1, 2, 3):
        for n in (0, 1, 2, 3):
            for seed in (0, 1):
                acc = 90.0 + m + 0.1 * n + 0.05 * seed
                write_typed_job(tmp_path / str(index), m, n, seed, acc=acc, converted_acc=acc - 0.2 - 0.1 * n)
                index += 1
    results, baselines = results_for(tmp_path)
    fig = report.plot_accuracy_vs_size(results, baselines, tmp_path / "size.png")
    assert_valid_png(tmp_path / "size.png")
    labels = [t for t in fig.axes[0].texts if t.get_gid() == plots.LABEL_GID]
    assert sorted(t.get_text() for t in labels) == sorted([r.id for r in results] * 2)
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text, not its leader line
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), "two point labels overlap"
    axes_box = fig.axes[0].get_window_extent(renderer)
    assert all(axes_box.contains(b.x0, b.y0) and axes_box.contains(b.x1, b.y1) for b in boxes)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "12: M=3 N=3" in legend and "1: M=1 N=FP" in legend
    assert "test set: 359 images" in fig.axes[0].get_title()


def test_paper_sweep_plot_labels_do_not_collide(tmp_path: Path) -> None:
    """The ImageNet ResNet-18 setting adds the paper's points (and their ids) to the size plot."""
    for index, (m, n) in enumerate([(1, 1), (3, 1), (3, 3), (5, 3), (5, 5)]):
        write_typed_job(tmp_path / str(index), m, n, 0, dataset="imagenet", model="resnet18",
                        acc=40.0 + 4 * m + n, fp_acc=69.0, test_size=50000)
    results, baselines = results_for(tmp_path)
    fig = report.plot_accuracy_vs_size(results, baselines, tmp_path / "size.png")
    labels = [t for t in fig.axes[0].texts if t.get_gid() == plots.LABEL_GID]
    assert {t.get_text() for t in labels} >= {"P1", "P7", "1", "5"}
    boxes = [Text.get_window_extent(t, fig.canvas.get_renderer()) for t in labels]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
