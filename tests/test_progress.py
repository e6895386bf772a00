"""Progress that never goes silent: when stderr is not a terminal, long loops log a line at a steady
interval (count, rate, ETA), and calibration logs each layer."""

from __future__ import annotations

import logging

from helpers import TINY

import abc_experiments.training as training
from abc_experiments.pipeline import run
from abc_experiments.progress import Progress, format_duration


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_every_interval_with_rate_and_eta(caplog):
    clock = FakeClock()
    progress = Progress(100, "finetune epoch 1/3", bar=False, items_per_step=64, interval_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="abc_experiments.progress"):
        for _ in range(10):  # 10 steps of 1 s: within the interval, nothing
            clock.now += 1
            progress.update(1, loss="0.5000")
        assert caplog.messages == []
        for _ in range(20):
            clock.now += 1
            progress.update(1)
    assert caplog.messages == ["finetune epoch 1/3: 30/100 steps (30%), 64 img/s, ETA 1m10s, loss 0.5000"]


def test_format_duration():
    assert [format_duration(s) for s in (9, 75, 4000)] == ["9s", "1m15s", "1h06m"]


def test_a_run_logged_to_a_file_shows_training_and_calibration_progress(compose_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(training, "INTERVAL_S", 0.0)  # a line at every step (stderr is not a terminal here)
    with caplog.at_level(logging.INFO):
        run(compose_cfg(TINY))
    lines = caplog.messages
    assert any(line.startswith("pretrain epoch 1/2: 1/") and "img/s" in line and "ETA" in line for line in lines)
    assert any(line.startswith("finetune epoch 1/1: ") for line in lines)
    assert any(line.startswith("calibrated conv2 (1/1 layers") for line in lines)
