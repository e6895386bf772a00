"""Reopening a finished run: load_run, abc-eval and abc-export reproduce its numbers; bad run dirs
say why."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import read_summary, run_cli

from abc_experiments import load_run
from abc_experiments.export import MODEL_FILE, REPORT_FILE, export_run
from abc_experiments.nn import abc_layers
from abc_experiments.packed import load_packed, packed_layers
from abc_experiments.runs import RunError, evaluate_run

pytestmark = pytest.mark.slow  # a whole (tiny) resnet20 run, shared by every test here


def test_load_run_and_abc_eval_reproduce_the_finetuned_accuracy_exactly(finished_run):
    summary = read_summary(finished_run)
    model = load_run(finished_run)
    assert not model.training and any(layer.bias_from_calibration for _, layer in abc_layers(model))
    result = evaluate_run(finished_run)
    assert result["acc"] == summary["finetuned"]["acc"]
    assert result["loss"] == pytest.approx(summary["finetuned"]["loss"])
    assert result["images"] == summary["finetuned"]["test_size"] == 359 and result["images_per_s"] > 0
    last = load_run(finished_run, which="last")
    assert set(last.state_dict()) == set(model.state_dict())


def test_abc_eval_command_prints_accuracy_loss_and_throughput(finished_run, tmp_path):
    summary = read_summary(finished_run)
    result = run_cli([str(finished_run)], cwd=tmp_path, name="abc-eval")
    assert result.returncode == 0, result.stderr
    assert f"test accuracy {summary['finetuned']['acc']:.2f}%" in result.stdout
    assert "images/s" in result.stdout and "loss" in result.stdout


def test_load_run_errors_name_what_is_wrong(finished_run, tmp_path):
    with pytest.raises(RunError, match="is not a directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(RunError, match="holds no summary.json"):
        load_run(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    with pytest.raises(RunError, match="is corrupt"):
        load_run(broken)
    failed = tmp_path / "failed"
    failed.mkdir()
    summary = json.loads((finished_run / "summary.json").read_text())
    (failed / "summary.json").write_text(json.dumps({**summary, "status": "failed", "error": "boom"}))
    with pytest.raises(RunError, match="is failed, not finished.*boom"):
        load_run(failed)
    (failed / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(RunError, match="finetuned.pt does not exist"):
        load_run(failed)
    (failed / "checkpoints").mkdir()
    (failed / "checkpoints" / "finetuned.pt").write_bytes(b"garbage")
    with pytest.raises(RunError, match="not a readable torch checkpoint"):
        load_run(failed)
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, failed / "checkpoints" / "finetuned.pt")
    with pytest.raises(RunError, match="does not fit the model"):
        load_run(failed)
    with pytest.raises(ValueError, match="which='worst'"):
        load_run(finished_run, which="worst")


def test_abc_export_packed_accuracy_equals_the_finetuned_accuracy(confident_run, tmp_path):
    report = export_run(confident_run, tmp_path / "export")
    summary = read_summary(confident_run)
    assert summary["finetuned"]["acc"] > 80  # confident: no near-ties for float rounding to flip
    assert report["packed_acc"] == report["finetuned_acc"] == summary["finetuned"]["acc"]
    assert report["test_size"] == 359 and report["M"] == 2 and report["N"] == 2
    # both conv2 and fc1 are packed; the packed logits equal the float ABC model's
    model, packed_model = load_run(confident_run), load_packed(tmp_path / "export" / MODEL_FILE)
    assert [name for name, _ in packed_layers(packed_model)] == ["conv2", "fc1"]
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        expected, got = model(x), packed_model(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    path = tmp_path / "export" / MODEL_FILE
    assert report["file_bytes"] == path.stat().st_size and report["file_bytes"] < report["fp32_bytes"]
    assert report["bits_per_binary_weight"] == pytest.approx(2, abs=0.05)  # M bits, padded to whole words
    assert json.loads((tmp_path / "export" / REPORT_FILE).read_text()) == report
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.read_bytes()[8:9] == b"{" and header_length < 1 << 20  # a safetensors header, no pickle


def test_abc_export_command_and_its_bad_inputs(finished_run, tmp_path):
    result = run_cli([str(finished_run), "--out", str(tmp_path / "out")], cwd=tmp_path, name="abc-export")
    assert result.returncode == 0, result.stderr
    assert "packed accuracy (file)" in result.stdout and "bits per binary weight" in result.stdout
    for bad, message in ((tmp_path / "nowhere", "is not a directory"), (tmp_path, "holds no summary.json")):
        result = run_cli([str(bad)], cwd=tmp_path, name="abc-export")
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    summary = json.loads((finished_run / "summary.json").read_text())
    (unfinished / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    result = run_cli([str(unfinished)], cwd=tmp_path, name="abc-export")
    assert result.returncode == 1 and "is interrupted, not finished (resume it with resume=true" in result.stderr
