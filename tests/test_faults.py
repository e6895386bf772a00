"""Regression tests for the faults found by probing every input and interruption (issue 12)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_datasets import write_fake_mnist
from helpers import TINY, cli_command, read_summary, run_cli, tree_bytes
from hydra.core.override_parser.overrides_parser import OverridesParser

from abc_experiments.checkpoints import CheckpointError, load_checkpoint
from abc_experiments.config import ConfigError
from abc_experiments.data import DatasetUnavailableError, build_datasets
from abc_experiments.pipeline import run
from abc_experiments.results import ABCSetting, RunSummary
from abc_experiments.rundirs import override_arg
from abc_experiments.settings import RUN_ONLY_KEYS
from abc_experiments.training import make_optimizer, make_scheduler

ROOT = Path(__file__).resolve().parents[1]


# ---- 1. the printed resume command works when pasted ---------------------------------------
@pytest.mark.parametrize("value", ["outputs/runs/2026_ab12_abc.M=3,abc.N=2", "/tmp/a b/it's=here,x", "plain/dir"])
def test_override_arg_survives_the_shell_and_hydra(value):
    (word,) = shlex.split(override_arg("hydra.run.dir", value))
    (override,) = OverridesParser.create().parse_overrides([word])
    assert override.key_or_group == "hydra.run.dir" and override.value() == value


@pytest.mark.slow
def test_interrupted_run_resumes_with_the_printed_command(tmp_path):
    """A default run dir holds '=' and ','; the printed command must still resume it."""
    process = subprocess.Popen(cli_command() + TINY + ["pretrain.epochs=3", "pretrain.batch_size=8"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(600):
        if list(tmp_path.glob("outputs/runs/*/checkpoints/pretrain_last.pt")) or process.poll() is not None:
            break
        subprocess.run(["sleep", "0.1"])
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert "=" in run_dir.name and "," in run_dir.name
    command = output.split("resume with:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith("abc-run ") and "resume=true" in command
    # the printed command, pasted into a shell as it is
    script = Path(cli_command()[0]).parent
    env = {**os.environ, "PATH": f"{script}{os.pathsep}{os.environ['PATH']}"}
    pasted = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=600)
    assert pasted.returncode == 0, pasted.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["resumed_from"][0]["stage"] == "pretrain"


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_stops_cleanly(tmp_path):
    """Ctrl-C and schedulers signal the whole process group: DataLoader workers must not die first
    (the main process then failed with "DataLoader worker ... is killed by signal" and exit 1)."""
    process = subprocess.Popen(cli_command() + TINY + ["pretrain.epochs=3", "pretrain.batch_size=8",
                                                       "data.num_workers=1"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    for _ in range(600):
        if list(tmp_path.glob("outputs/runs/*/checkpoints/pretrain_last.pt")) or process.poll() is not None:
            break
        subprocess.run(["sleep", "0.1"])
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "resume with:" in output and "Traceback" not in output and "killed by signal" not in output


# ---- 2. a refused resume leaves the run dir byte-for-byte as it was --------------------------
@pytest.mark.slow
def test_refused_resume_changes_nothing_in_a_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(TINY + [f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree_bytes(run_dir)
    refused = run_cli(TINY + ["abc.M=3", f"hydra.run.dir={run_dir}", "resume=true", f"cache_dir={tmp_path / 'cache'}"],
                      cwd=tmp_path)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 1 and "Traceback" not in output
    assert "abc.M: 2 -> 3" in output and "Nothing was changed" in output
    assert tree_bytes(run_dir) == before


# ---- 3. config errors before anything trains (see also test_runner's range errors) ----------
@pytest.mark.parametrize("schedule,message", [({"schedule": "step", "step_size": 0, "gamma": 0.1}, "step_size"),
                                              ({"schedule": "step", "step_size": 2, "gamma": -1.0}, "gamma"),
                                              ({"schedule": "linear"}, "unknown schedule")])
def test_scheduler_refuses_what_would_crash_or_ascend(schedule, message):
    cfg = type("Stage", (), {"epochs": 3, "optimizer": "adam", "lr": 0.1, "weight_decay": 0.0, "momentum": 0.9,
                             **schedule})
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    with pytest.raises(ValueError, match=message):
        make_scheduler(optimizer, cfg)


def test_unknown_optimizer_is_an_error_not_adam():
    cfg = type("Stage", (), {"optimizer": "adamw", "lr": 0.1, "weight_decay": 0.0, "momentum": 0.9})
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'"):
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)


def test_exclude_hint_names_real_keys_and_only_advice_not_taken(compose_cfg, tmp_path):
    with pytest.raises(ConfigError) as error:
        run(compose_cfg(TINY + ["abc.exclude=[conv2]", "abc.keep_last=false", "abc.linear=true",
                                "abc.exclude=[conv2,fc1,fc2]"]))
    message = str(error.value)
    assert "abc.keep_first=false" in message and "fewer abc.exclude patterns" in message
    assert "abc.keep_last=false" not in message and "abc.linear=true" not in message
    assert not (tmp_path / "run").exists()


# ---- 4. divergence without NaN ----------------------------------------------------------------
def test_exploding_loss_stops_the_stage_and_is_never_cached(compose_cfg, tmp_path):
    from abc_experiments.training import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"the pretrain loss exploded to .* at epoch 1, step \d+ \(lr 1e\+06\)"):
        run(compose_cfg(TINY + ["pretrain.lr=1e6"]))
    assert read_summary(tmp_path / "run")["status"] == "failed"
    assert not list((tmp_path / "cache").rglob("*.pt"))


# ---- 5. sweeps report failed jobs in their exit status: test_sweeps.py's failing-job test ---------


# ---- 6. messages that say what is wrong ---------------------------------------------------------
class Pickled:
    pass


def test_pickled_checkpoint_is_called_unsafe_plainly(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": Pickled()}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, "pretrain.checkpoint")
    message = str(error.value)
    assert "is not a safe weights-only checkpoint" in message and "torch.save(model.state_dict(), path)" in message
    assert "Re-running" not in message and "weights_only set to False" not in message


@pytest.mark.slow
def test_corrupt_cache_entry_is_retrained_with_a_warning(compose_cfg, tmp_path, caplog):
    first = run(compose_cfg(TINY, run_dir=tmp_path / "a"))
    (entry,) = (tmp_path / "cache" / "pretrain").glob("*.pt")
    entry.write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        second = run(compose_cfg(TINY, run_dir=tmp_path / "b"))
    assert "retraining the FP model" in caplog.text and str(entry) in caplog.text
    assert read_summary(tmp_path / "b")["fp_source"] == "trained" and second == first
    assert isinstance(load_checkpoint(entry), dict)  # the entry was replaced


def test_corrupt_mnist_file_is_named_without_blaming_a_download(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, gzipped=True)
    archive = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    archive.write_bytes(archive.read_bytes()[:50])  # truncated
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DatasetUnavailableError) as error:
        build_datasets("mnist", root=tmp_path, download=True)
    message = str(error.value)
    assert str(archive.resolve()) in message and "corrupt" in message
    assert "download" not in message.split("(from")[0]


@pytest.mark.slow
# ---- 7. small ones --------------------------------------------------------------------------------
def test_config_value_failure_leaves_no_run_dir(tmp_path):
    result = run_cli(["abc.M=0", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 1 and "abc.M=0 is out of range" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


def test_killed_run_reads_as_interrupted(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    summary = RunSummary(dataset="digits", model="seed_cnn", seed=0, abc=ABCSetting(2, 2), run_dir=str(tmp_path))
    summary.mark_running()
    summary.pid = child.pid
    summary.write(tmp_path / "summary.json")
    assert RunSummary.read(tmp_path / "summary.json").effective_status() == "running"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert RunSummary.read(tmp_path / "summary.json").effective_status() == "interrupted"


def test_run_only_keys_are_the_run_dir_exclude_keys():
    """One list: keys a resume may change are exactly those left out of run-dir names."""
    import yaml

    hydra_conf = yaml.safe_load((ROOT / "conf" / "hydra" / "default.yaml").read_text())
    assert set(hydra_conf["job"]["config"]["override_dirname"]["exclude_keys"]) == set(RUN_ONLY_KEYS)


def test_a_job_waiting_for_another_to_train_the_fp_model_says_so(tmp_path, caplog):
    """Concurrent sweep jobs wait on the pretrain cache's lock; the waiting one logs why it is idle."""
    import threading

    from filelock import FileLock

    from abc_experiments.checkpoints import PretrainCache

    cache = PretrainCache(tmp_path, "seed_cnn-digits", {"seed": 0})
    cache.path.parent.mkdir(parents=True)
    other = FileLock(str(cache.path) + ".lock")
    other.acquire()  # another process training the model
    entered = threading.Event()

    def job():
        with cache.lock():
            entered.set()

    with caplog.at_level("INFO", logger="abc_experiments.checkpoints"):
        waiting = threading.Thread(target=job)
        waiting.start()
        assert not entered.wait(0.5)  # blocked while the lock is held
        other.release()
        waiting.join(10)
    assert entered.is_set()
    assert "another process is training this FP model" in caplog.text

    caplog.clear()
    with caplog.at_level("INFO", logger="abc_experiments.checkpoints"), cache.lock():
        pass
    assert caplog.text == ""  # a free lock: no message
