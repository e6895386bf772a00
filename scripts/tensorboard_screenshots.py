"""Screenshots of a real TensorBoard in headless Chromium: what a researcher sees first.

Starts ``tensorboard --logdir DIR`` on a free localhost port, waits until it answers, and takes
full-window screenshots of the Time Series, Scalars and HParams dashboards with headless Chromium
(Debian's ``chromium`` package: ``apt-get install chromium``). Without ``--logdir`` it first runs a
small sweep on the bundled digits (``abc-run -m abc.M=1,3`` with two FP and two fine-tuning
epochs), so the pictures show the layout of a sweep: one FP run per pretraining and one ABC run
per job.

    python scripts/tensorboard_screenshots.py                      # the demo sweep
    python scripts/tensorboard_screenshots.py --logdir outputs/multirun/<sweep>

Writes ``timeseries.png``, ``scalars.png`` and ``hparams.png`` into ``--out`` (default
``outputs/tensorboard_screenshots``) and prints their paths. Exit status 2 when Chromium or
TensorBoard is missing, with the command that installs it.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# forceSVG: SVG line charts (TensorBoard's WebGL charts are drawn unreliably without a GPU)
PAGES = {"timeseries": "?forceSVG=true#timeseries", "scalars": "?forceSVG=true#scalars", "hparams": "#hparams"}
CHROMIUM_FLAGS = [  # no background connections: this machine's network is closed
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]
DEMO_SWEEP = ["-m", "abc.M=1,3", "abc.N=1", "pretrain.epochs=2", "finetune.epochs=2", "device=cpu", "progress=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tensorboard exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url + "data/runs", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"tensorboard did not answer at {url} within {timeout_s:.0f} s")


def screenshot(chromium: str, url: str, path: Path, size: str, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=120)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}")


def demo_sweep(root: Path) -> Path:
    sweep = root / "demo_sweep"
    command = [sys.executable, "-m", "abc_experiments.cli", *DEMO_SWEEP, f"hydra.sweep.dir={sweep}",
               f"cache_dir={root / 'cache'}"]
    print("running the demo sweep:", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, cwd=root)
    return sweep


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=None, help="a run or sweep dir (default: run a demo sweep)")
    parser.add_argument("--out", type=Path, default=Path("outputs/tensorboard_screenshots"))
    parser.add_argument("--size", default="1600,1000", help="window size WIDTH,HEIGHT in pixels")
    parser.add_argument("--wait-ms", type=int, default=25000, help="page time Chromium gives TensorBoard to draw")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    tensorboard = shutil.which("tensorboard") or str(Path(sys.executable).with_name("tensorboard"))
    if chromium is None:
        print("no Chromium on this machine: apt-get install chromium (Debian), then run this again", file=sys.stderr)
        return 2
    if not Path(tensorboard).is_file():
        print("no tensorboard next to this Python: pip install tensorboard", file=sys.stderr)
        return 2
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.logdir.absolute() if args.logdir else demo_sweep(args.out)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([tensorboard, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_up(url, server)
        for name, fragment in PAGES.items():
            path = args.out / f"{name}.png"
            screenshot(chromium, url + fragment, path, args.size, args.wait_ms)
            print(f"wrote {path}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
