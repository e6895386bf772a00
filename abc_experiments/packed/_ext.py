"""Loading the C++ kernels (JIT-built with ``torch.utils.cpp_extension.load`` and ninja at first use)
and choosing the kernel path (ISA).

Paths: ``avx512`` (AVX-512 F/BW/DQ/VL + VPOPCNTDQ), ``avx2`` (AVX2 + FMA), ``portable`` (plain C++)
and ``reference`` (pure torch, no extension). The default is the best one this CPU runs; force
one with the environment variable ``ABC_PACKED_ISA`` or :func:`set_isa` / :func:`use_isa`.
If the extension cannot be built or loaded, ONE warning names the cause and the fix, and every
packed layer uses the reference path (same results).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import torch

from .. import cpp_build
from ..cpp_build import load_extension, load_once, source_digest

log = logging.getLogger(__name__)

ISAS = ("avx512", "avx2", "portable", "reference")
# The AVX-512 code with its AVX-512 intrinsics emulated in plain C++ on an AVX2 CPU: for tests of
# that code on machines without AVX-512 (slow; never chosen by "auto", only by name).
TEST_ISAS = ("avx512_emulated",)
# native path -> the operators' isa code; filled from the C++ list (isa_names()) when the extension loads
ISA_CODES: dict[str, int] = {}
ENV_VAR = "ABC_PACKED_ISA"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("register.cpp", "kernels.cpp")
CFLAGS = ["-O3"]


class PackedKernelWarning(UserWarning):
    """The C++ kernels are unavailable; the pure-torch reference path is used."""


_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None, "forced": None, "cpu_isas": None, "resolved": None}


def extension_name() -> str:
    """The extension's name; it changes with the sources and flags, so a stale build is never reused."""
    return f"abc_packed_{source_digest(CSRC, CFLAGS)}"


def build_directory() -> Path:
    """Where the extension is built: this checkout's own folder (:func:`abc_experiments.cpp_build.build_root`)."""
    return cpp_build.build_directory(extension_name())


def _load() -> None:
    load_extension(extension_name(), [str(CSRC / source) for source in SOURCES], CFLAGS, [str(CSRC)],
                   what="packed ABC kernels", usual_seconds=90)


def extension_available() -> bool:
    """Load (building if needed) the C++ kernels once; False, with one warning, if that fails."""
    return load_once(_state, _lock, lambda: (_load(), torch.ops.abc_packed.cpu_features(), _read_isa_codes()),
                     "abc_experiments.packed: the C++ kernels",
                     "using the pure-torch reference path, which gives the same results but is much slower "
                     "(set ABC_PACKED_ISA=reference to silence this warning)", PackedKernelWarning)


def _read_isa_codes() -> None:
    names = torch.ops.abc_packed.isa_names()
    unknown = set(names) - set(ISAS + TEST_ISAS)
    if unknown:
        raise RuntimeError(f"the packed kernels name paths this module does not know: {sorted(unknown)}")
    ISA_CODES.update({name: code for code, name in enumerate(names)})


def extension_error() -> Exception | None:
    """Why the extension is unavailable (None if it loaded or was never tried)."""
    return _state["error"]


def cpu_isas() -> tuple[str, ...]:
    """The native kernel paths this CPU can run (empty if the extension is unavailable)."""
    if not extension_available():
        return ()
    if _state["cpu_isas"] is None:  # the CPU does not change: ask it once (layers ask every call)
        features = int(torch.ops.abc_packed.cpu_features())
        found = [isa for isa, bit in (("avx512", 2), ("avx2", 1)) if features & bit]
        _state["cpu_isas"] = (*found, "portable")
    return _state["cpu_isas"]


def emulated_isas() -> tuple[str, ...]:
    """The test-only paths this CPU can run (:data:`TEST_ISAS`; they need AVX2)."""
    return TEST_ISAS if "avx2" in cpu_isas() else ()


def runnable_isas() -> tuple[str, ...]:
    """Every native path this CPU can run when asked by name: :func:`cpu_isas` and the test-only ones."""
    return cpu_isas() + emulated_isas()


def available_isas() -> tuple[str, ...]:
    """Every path usable here, best first; always ends with ``"reference"``."""
    return (*cpu_isas(), "reference")


def _check_name(name: str) -> str:
    if name not in ISAS + TEST_ISAS:
        raise ValueError(f"unknown packed kernel path {name!r}: choose one of {', '.join(ISAS)} (or 'auto'; "
                         f"{', '.join(TEST_ISAS)} for tests)")
    return name


def set_isa(name: str | None) -> None:
    """Force a kernel path for this process (``None`` or ``"auto"``: back to the env var / the best)."""
    _state["forced"] = None if name in (None, "auto") else _check_name(name)


def get_isa() -> str:
    """The path packed layers use now: :func:`set_isa`, else ``ABC_PACKED_ISA``, else the best."""
    # every packed layer asks on every call: remember the answer for the same request and load state
    key = (_state["forced"], os.environ.get(ENV_VAR), _state["loaded"] is not None, _state["error"] is None)
    cached = _state["resolved"]
    if cached is not None and cached[0] == key:
        return cached[1]
    name = _resolve_isa()
    _state["resolved"] = (key, name)
    return name


def _resolve_isa() -> str:
    name = _state["forced"] or os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if name == "reference":
        return name
    if name == "auto":
        return available_isas()[0]
    _check_name(name)
    if not extension_available():
        return "reference"  # the warning has said why
    if name not in runnable_isas():
        raise RuntimeError(f"packed kernel path {name!r} was requested ({ENV_VAR} or set_isa) but this CPU "
                           f"cannot run it; available here: {', '.join(available_isas())}")
    return name


@contextlib.contextmanager
def use_isa(name: str | None):
    """Context manager: run packed layers on ``name`` inside the block."""
    previous = _state["forced"]
    set_isa(name)
    try:
        yield get_isa()
    finally:
        _state["forced"] = previous
