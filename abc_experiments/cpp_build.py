"""Building and loading a C++ extension with ``torch.utils.cpp_extension.load`` (ninja, at first
use, cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), quietly: the
build's chatter goes to the log, and torch's note that no CUDA runtime exists (these kernels are
CPU-only) is not shown. Shared by the packed kernels and the native activation kernel."""

from __future__ import annotations

import contextlib
import io
import logging

log = logging.getLogger(__name__)


def load_extension(name: str, sources: list[str], extra_cflags: list[str], include_paths: list[str]) -> None:
    """Build (if needed) and load the extension ``name``; its ops register themselves."""
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant for CPU kernels
    try:
        from torch.utils.cpp_extension import load

        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            load(name=name, sources=sources, extra_cflags=extra_cflags, extra_include_paths=include_paths,
                 is_python_module=False, verbose=False)
    finally:
        cpp_log.setLevel(level)
    if captured.getvalue().strip():
        log.debug("%s build output:\n%s", name, captured.getvalue())
