"""Building and loading a C++ extension with ``torch.utils.cpp_extension.load`` (ninja, at first
use), quietly: the build's chatter goes to the log, and torch's note that no CUDA runtime exists
(these kernels are CPU-only) is not shown. Shared by the packed kernels and the native activation
kernel.

Each checkout builds into its own directory (:func:`build_root`): under ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``), a folder named by the Python environment, the checkout's
path and torch's version. Ninja's build files record the sources' and torch's header *paths*, so two
checkouts (or two virtual environments) sharing one folder rebuilt each other's kernels at every
alternation and waited on each other's lock; with one folder each, a warm machine never rebuilds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
import threading
import time
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


PACKAGE_DIR = Path(__file__).resolve().parent


def build_root() -> Path:
    """The folder this checkout's extensions build into: ``<TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions>/abc_experiments-<12 hex digits>``, the digits over the Python
    environment (``sys.prefix``), this package's path and torch's version.

    Returns:
        The folder (not created here).
    """
    import torch

    base = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    key = "\0".join((str(Path(sys.prefix).resolve()), str(PACKAGE_DIR), torch.__version__))
    return Path(base).expanduser() / f"abc_experiments-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def build_directory(name: str) -> Path:
    """Where the extension ``name`` is built: ``build_root() / name``."""
    return build_root() / name


def _built_library(directory: Path, name: str) -> bool:
    return (directory / f"{name}.so").is_file() or (directory / f"{name}.pyd").is_file()


def load_extension(name: str, sources: list[str], extra_cflags: list[str], include_paths: list[str],
                   what: str = "C++ kernels", usual_seconds: int = 60) -> None:
    """Build (if needed) and load the extension ``name`` from :func:`build_directory`; its ops
    register themselves. The callers put ``extra_cflags`` and :func:`openmp_flags` into ``name``, so
    a build with other flags is never reused.

    Before a build, ONE line (log level INFO, on stderr when logging is not configured) says what is
    built, where, and how long it usually takes (``usual_seconds``, measured on 2 cores); a build that
    has to wait for another process's lock on the same folder says so too.
    """
    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    if not _built_library(directory, name):
        _announce(f"building the {what} ({name}, usually about {usual_seconds} s on 2 cores, once per "
                  f"checkout and torch version) in {directory}")
    if lock_held_elsewhere(directory / "lock"):
        _announce(f"waiting for another process that is building the {what} in {directory} (it holds the "
                  f"lock on {directory / 'lock'}; the wait ends when that build does)")
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant for CPU kernels
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            load(name=name, sources=sources, extra_cflags=extra_cflags + openmp_flags(),
                 extra_ldflags=openmp_flags(), extra_include_paths=include_paths, is_python_module=False,
                 build_directory=str(directory), verbose=False)
    finally:
        cpp_log.setLevel(level)
    if captured.getvalue().strip():
        log.debug("%s build output:\n%s", name, captured.getvalue())
    log.debug("%s loaded in %.1f s", name, time.perf_counter() - started)


def lock_held_elsewhere(path: Path) -> bool:
    """Whether another process holds torch's build lock ``path`` now. torch (2.x) takes an advisory
    ``FileLock`` on that file and leaves the empty file behind after every build, so the file's mere
    existence says nothing; a lock the kernel releases when its holder dies is tested by trying it.

    Args:
        path: the ``lock`` file in an extension's build folder.

    Returns:
        True if the lock could not be taken at once (a build is running elsewhere).
    """
    if not path.exists():
        return False
    from filelock import FileLock, Timeout  # a dependency of torch

    probe = FileLock(str(path), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


def _announce(message: str) -> None:
    """``message`` in the log; on stderr when nothing handles the log (a plain Python session)."""
    if logging.getLogger().handlers or log.handlers:
        log.info("%s", message)
    else:
        print(f"abc_experiments: {message}", file=sys.stderr, flush=True)


def build_failure(what: str, error: Exception, consequence: str) -> str:
    """The one warning for an extension that could not be built or loaded: the telling line of the
    failure (the compiler's first ``error:``), what happens instead, and the fix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines
               if "error:" in line.lower() or "ninja is required" in line.lower() or "not found" in line.lower()]
    cause = (telling or lines or [type(error).__name__])[0][:400]
    return (f"{what} could not be built or loaded ({type(error).__name__}: {cause}); {consequence}. To fix: "
            "install a C++ compiler (e.g. g++) and ninja (`pip install ninja`), then restart Python (a broken "
            f"build folder, {build_root()}, can be deleted).")


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
