"""Regression tests for the command-line faults found by probing (issue 19, faults 1-4; issue 20,
typos and slow refusals): each failed before its fix."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, run_cli

from abc_experiments import runs
from abc_experiments.checkpoints import CheckpointError, atomic_write, load_checkpoint
from abc_experiments.cli import unknown_override_key
from abc_experiments.config import ConfigError, to_container, unknown_keys, validate
from abc_experiments.export import MODEL_FILE, REPORT_FILE, export_run, format_report
from abc_experiments.results import FINISHED, ABCSetting, RunSummary, StageResult
from abc_experiments.settings import closest_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_run(compose_cfg, tmp_path):
    """A run dir whose summary.json reads as a finished tiny run (no checkpoint: every refusal
    tested with it happens before the model is loaded)."""
    run_dir = tmp_path / "fake_run"
    summary = RunSummary(dataset="digits", model="seed_cnn", seed=0, abc=ABCSetting(2, 2), run_dir=str(run_dir),
                         status=FINISHED, config=to_container(compose_cfg(TINY, run_dir=run_dir)),
                         input_shape=[1, 8, 8], num_classes=10, finetuned=StageResult(90.0, 0.3, 90.0, 0.3))
    summary.write(run_dir / "summary.json")
    return run_dir


def edit_summary(run_dir: Path, edit) -> None:
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    edit(summary)
    path.write_text(json.dumps(summary))


def one_clean_line(result) -> str:
    """The single stderr line of a refused command (no traceback, non-zero exit)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---- issue 19.1: abc-eval accepts only what an evaluation can use --------------------------------
@pytest.mark.parametrize("override, message", [
    ("nosuch.key=1", "nosuch.key is not a key abc-eval accepts; it accepts dataset.name, data.root"),
    ("data.rot=elsewhere", "data.rot is not a key abc-eval accepts (did you mean data.root?)"),
    ("datset.name=mnist", "(did you mean dataset.name?)"),
    ("abc.M=3", "abc.M describes how the model was trained, which abc-eval cannot change"),
    ("finetune.eval_batch_size=many", "finetune.eval_batch_size='many' is not an integer"),
    ("finetune.eval_batch_size=0", "finetune.eval_batch_size=0 is out of range"),
    ("channels_last=maybe", "channels_last='maybe' is not true or false"),
    ("+data.root=x", "'+data.root=x' is not KEY=VALUE"),
])
def test_abc_eval_refuses_an_override_it_cannot_use(fake_run, tmp_path, override, message):
    line = one_clean_line(run_cli([str(fake_run), override], cwd=tmp_path, name="abc-eval"))
    assert message in line


def test_abc_eval_accepts_the_evaluation_overrides(fake_run):
    summary = runs.read_run(fake_run)
    values = runs.check_overrides(summary, ["dataset.name=mnist", "data.root=~/d", "data.num_workers=null",
                                            "finetune.eval_batch_size=512", "precision=bf16-mixed",
                                            "channels_last=true"])
    assert values == {"dataset.name": "mnist", "data.root": "~/d", "data.num_workers": None,
                      "finetune.eval_batch_size": 512, "precision": "bf16-mixed", "channels_last": True}
    loader, config = runs.test_loader(summary, ["finetune.eval_batch_size=7"])
    assert loader.batch_size == 7 and config.finetune.eval_batch_size == 7


def test_abc_eval_refuses_a_device_that_is_not_one(fake_run, tmp_path):
    line = one_clean_line(run_cli([str(fake_run), "--device", "foo"], cwd=tmp_path, name="abc-eval"))
    assert line.startswith("abc-eval: --device foo is not a device: use one of --device auto, --device cpu")


def test_abc_eval_refuses_cuda_without_a_gpu(fake_run, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runs.main([str(fake_run), "--device", "cuda"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == ("abc-eval: --device cuda but no CUDA device is available: use --device cpu or --device auto")


# ---- issue 19.2: abc-export checks the summary as abc-eval does ------------------------------------
@pytest.mark.parametrize("name", ["abc-eval", "abc-export"])
@pytest.mark.parametrize("where", ["config", "top"])
def test_edited_summary_with_a_non_integer_M_gets_one_line(fake_run, tmp_path, name, where):
    def edit(summary):
        (summary["config"] if where == "config" else summary)["abc"]["M"] = "two"

    edit_summary(fake_run, edit)
    line = one_clean_line(run_cli([str(fake_run)], cwd=tmp_path, name=name))
    key = "config.abc.M" if where == "config" else "abc.M"
    assert f"{key} is 'two', not an integer ≥ 1: the summary was edited or is corrupt" in line


# ---- issue 19.4: a checkpoint of pickled code is called that, not corrupt --------------------------
class RunsCode:
    """Unpickling this calls a function: what a pickle carrying code does."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("write", [
    lambda path: torch.save({"model": RunsCode()}, path),
    lambda path: path.write_bytes(pickle.dumps({"model": RunsCode()}, protocol=4)),  # a plain pickle
])
def test_checkpoint_of_pickled_code_is_named_plainly(tmp_path, write):
    path = tmp_path / "code.pt"
    write(path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, "pretrain.checkpoint")
    message = str(error.value)
    assert "holds pickled Python objects and was not loaded" in message
    assert "corrupt" not in message and "torch.save(model.state_dict(), path)" in message


def test_damaged_checkpoint_is_still_called_corrupt(tmp_path):
    path = tmp_path / "damaged.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt or another format"):
        load_checkpoint(path)


# ---- issue 20.3: typos refused, even with + --------------------------------------------------------
@pytest.mark.parametrize("typed, meant", [("abc.m", "abc.M"), ("abc.calibration.batch", "abc.calibration.batches"),
                                          ("finetune.learning_rate", "finetune.lr"), ("datset.name", "dataset.name")])
def test_closest_key(typed, meant):
    from abc_experiments.config import schema_keys

    assert closest_key(typed, schema_keys()) == meant
    assert closest_key("nosuch.key", schema_keys()) is None


@pytest.mark.slow  # a subprocess abc-run; test_unknown_override_key_checks_value_keys_only covers the check
def test_abc_run_refuses_an_unknown_key_in_one_line(tmp_path):
    """Even with the + that Hydra's own message suggests; ``abc.m=3`` takes the same path (below)."""
    result = run_cli(["+abc.m=3", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=120)
    line = one_clean_line(result)
    assert "abc.m is not a config key of abc-run (did you mean abc.M?)" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, key", [
    (["abc.m=3"], "abc.m"), (["++abc.m=3"], "abc.m"), (["-m", "+abc.m=1,2"], "abc.m"), (["~abc.m"], "abc.m"),
    (["abc.M=2", "finetune.learning_rate=1e-3"], "finetune.learning_rate"),
    (["dataset=mnist", "model=resnet20", "+model.options.width=2", "hydra/launcher=basic", "hydra.job.chdir=false",
      "abc.M=2", "abc.calibration.batches=1", "experiment=seed_mnist", "--cfg", "job"], None),
    (["--cfg", "nosuch"], None),  # Hydra's own parser explains a bad option
])
def test_unknown_override_key_checks_value_keys_only(argv, key):
    assert unknown_override_key(argv) == key


def test_config_groups_are_the_folders_of_conf():
    from abc_experiments.config import CONFIG_GROUPS

    assert sorted(CONFIG_GROUPS) == sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name[0] != "_")


def test_composed_config_with_an_added_key_is_refused(compose_cfg):
    """The Python path (compose + run) is closed too: validate() refuses what + added."""
    with pytest.raises(ConfigError, match=r"abc\.m is not a config key of abc-run \(did you mean abc\.M\?\)"):
        validate(compose_cfg(["+abc.m=3"]))
    assert unknown_keys(compose_cfg(["+model.options.hidden=32"])) == []  # the model's builder checks those


# ---- issue 20.6: refusals before the heavy imports -------------------------------------------------
@pytest.mark.parametrize("module", ["abc_experiments.runs", "abc_experiments.export"])
def test_not_a_run_is_refused_before_torch_is_imported(tmp_path, fake_run, module):
    arguments = [[str(tmp_path / "missing")], [str(tmp_path)]]
    if module.endswith("runs"):
        arguments += [[str(fake_run), "nosuch.key=1"], [str(fake_run), "--device", "foo"]]
    code = (f"import json, sys\nfrom {module} import main\nresults = [main(a) for a in json.loads(sys.argv[1])]\n"
            "print(results, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == f"{[1] * len(arguments)} False", result.stdout + result.stderr


# ---- issue 19.2 and 19.3 with a real run: export.json describes its file; atomic; one mode --------
@pytest.fixture
def run_copy(confident_run, tmp_path):
    """A copy of the tiny finished run (M = 2, N = 2) that a test may edit."""
    copy = tmp_path / "run"
    shutil.copytree(confident_run, copy, ignore=shutil.ignore_patterns("export", "events.*"))
    return copy


@pytest.mark.slow
def test_export_json_describes_the_file_not_the_summary(run_copy, tmp_path):
    edit_summary(run_copy, lambda summary: summary["abc"].update(M=3, N=1))  # the run is M = 2, N = 2
    report = export_run(run_copy, tmp_path / "out")
    assert report["M"] == 2 and report["N"] == 2
    assert report["model"] == "seed_cnn" and report["dataset"] == "digits"
    assert "(M = 2 in the file)" in format_report(report)
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text()) == report
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {name: (tmp_path / "out" / name).stat().st_mode & 0o777 for name in (MODEL_FILE, REPORT_FILE)}
    assert modes == {MODEL_FILE: 0o666 & ~mask, REPORT_FILE: 0o666 & ~mask}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([MODEL_FILE, REPORT_FILE])


@pytest.mark.slow
def test_export_interrupted_while_evaluating_leaves_no_stale_report(run_copy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / REPORT_FILE).write_text(json.dumps({"M": 3, "file": "an earlier export"}))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies here: what it wrote so far stays

    monkeypatch.setattr(runs, "evaluate_model", killed)
    with pytest.raises(KeyboardInterrupt):
        export_run(run_copy, out)
    assert not (out / REPORT_FILE).exists()  # no report describes a file it did not check
    assert sorted(p.name for p in out.iterdir()) == [MODEL_FILE]  # complete (renamed into place), no temp file


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"first")
        os.chmod(tmp, 0o600)  # as safetensors creates its files
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"first" and [p.name for p in path.parent.iterdir()] == ["file.bin"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
