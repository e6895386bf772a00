"""Building and loading a C++ extension with ``torch.utils.cpp_extension.load`` (ninja, at first
use, cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), quietly: the
build's chatter goes to the log, and torch's note that no CUDA runtime exists (these kernels are
CPU-only) is not shown. Shared by the packed kernels and the native activation kernel."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def openmp_flags() -> list[str]:
    """``-fopenmp`` where torch runs its thread pool on OpenMP (its Linux builds): ``at::parallel_for``
    is a header template that splits work with ``#pragma omp parallel``, so an extension compiled
    without the flag silently runs every parallel_for on one thread. The extension then shares the
    libgomp that torch already loaded (same soname), so ``torch.set_num_threads`` governs it."""
    import sys

    import torch

    return ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def load_extension(name: str, sources: list[str], extra_cflags: list[str], include_paths: list[str]) -> None:
    """Build (if needed) and load the extension ``name``; its ops register themselves. The callers
    put ``extra_cflags`` and :func:`openmp_flags` into ``name``, so a build with other flags is
    never reused."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant for CPU kernels
    try:
        from torch.utils.cpp_extension import load

        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            load(name=name, sources=sources, extra_cflags=extra_cflags + openmp_flags(),
                 extra_ldflags=openmp_flags(), extra_include_paths=include_paths, is_python_module=False,
                 verbose=False)
    finally:
        cpp_log.setLevel(level)
    if captured.getvalue().strip():
        log.debug("%s build output:\n%s", name, captured.getvalue())


def build_failure(what: str, error: Exception, consequence: str) -> str:
    """The one warning for an extension that could not be built or loaded: the telling line of the
    failure (the compiler's first ``error:``), what happens instead, and the fix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines
               if "error:" in line.lower() or "ninja is required" in line.lower() or "not found" in line.lower()]
    cause = (telling or lines or [type(error).__name__])[0][:400]
    return (f"{what} could not be built or loaded ({type(error).__name__}: {cause}); {consequence}. To fix: "
            "install a C++ compiler (e.g. g++) and ninja (`pip install ninja`), then restart Python (a broken "
            "build cache under ~/.cache/torch_extensions/ can be deleted).")


def source_digest(csrc: Path, cflags: list[str]) -> str:
    """12 hex digits over every .cpp/.h below ``csrc``, the flags (with :func:`openmp_flags`) and
    torch's version: an extension named with it is rebuilt whenever any of them changes."""
    import torch

    digest = hashlib.sha256()
    for path in sorted(csrc.rglob("*")):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.relative_to(csrc).as_posix().encode())
            digest.update(path.read_bytes())
    digest.update(" ".join(cflags + openmp_flags()).encode())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:12]


def load_once(state: dict, lock: threading.Lock, load: Callable[[], None], what: str, consequence: str,
              category: type[Warning]) -> bool:
    """Run ``load`` (build and load an extension, then whatever checks the caller adds) the first time
    only; True if it worked. On failure ``state["error"]`` keeps the exception and ONE warning of
    ``category`` says what failed, ``consequence`` and the fix (:func:`build_failure`)."""
    if state["loaded"] is None:
        with lock:
            if state["loaded"] is None:
                try:
                    load()
                    state["loaded"] = True
                except Exception as error:  # no compiler, no ninja, a build error, an import error
                    state["loaded"], state["error"] = False, error
                    warnings.warn(build_failure(what, error, consequence), category, stacklevel=4)
    return bool(state["loaded"])
