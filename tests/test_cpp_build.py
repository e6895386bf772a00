"""One build folder per checkout: two checkouts (or two virtual environments) on one machine must not
share torch's extension folder, whose ninja files record the sources' paths, or they rebuild each
other's kernels at every alternation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from abc_experiments import cpp_build

HOLD_LOCK = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_build_root_differs_per_checkout_environment_and_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = cpp_build.build_root()
    assert here.parent == tmp_path and here.name.startswith("abc_experiments-")
    assert cpp_build.build_root() == here  # stable: a warm machine finds its build again

    monkeypatch.setattr(cpp_build, "PACKAGE_DIR", tmp_path / "second-clone" / "abc_experiments")
    other_checkout = cpp_build.build_root()
    monkeypatch.setattr(cpp_build, "PACKAGE_DIR", Path(cpp_build.__file__).resolve().parent)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    other_environment = cpp_build.build_root()
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)
    import torch
    monkeypatch.setattr(torch, "__version__", "0.0.1-other")
    other_torch = cpp_build.build_root()
    assert len({here, other_checkout, other_environment, other_torch}) == 4


def test_load_extension_builds_in_the_checkout_folder_and_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs)
        Path(kwargs["build_directory"], f"{kwargs['name']}.so").write_bytes(b"")

    import torch.utils.cpp_extension
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setattr(cpp_build, "_announce", lambda message: print(message))
    cpp_build.load_extension("abc_fake_123", ["x.cpp"], ["-O3"], [], what="fake kernels", usual_seconds=7)
    first = capsys.readouterr().out
    assert seen["build_directory"] == str(cpp_build.build_root() / "abc_fake_123")
    assert "building the fake kernels" in first and "about 7 s" in first and first.count("\n") == 1

    cpp_build.load_extension("abc_fake_123", ["x.cpp"], ["-O3"], [], what="fake kernels")  # already built
    assert capsys.readouterr().out == ""

    lock = cpp_build.build_root() / "abc_fake_123" / "lock"
    lock.write_text("")  # torch leaves the empty file behind after every build: no one is waiting
    cpp_build.load_extension("abc_fake_123", ["x.cpp"], ["-O3"], [], what="fake kernels")
    assert capsys.readouterr().out == ""

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another process is building now
        cpp_build.load_extension("abc_fake_123", ["x.cpp"], ["-O3"], [], what="fake kernels")
        assert "waiting for another process" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert not cpp_build.lock_held_elsewhere(lock)  # the kernel released it with its holder
