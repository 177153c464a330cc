"""Interrupts: Ctrl-C during a CLI command stops it cleanly, whatever TVM is doing.

Not a pipeline stage: the CLI installs :func:`on_sigint`, loads the compiler with
:func:`import_compiler`, and :func:`tvmq.bundle.staged_output` asks :func:`interrupt_requested`
before it renames a finished bundle into place.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["import_compiler", "interrupt_requested", "on_sigint"]

_interrupt_requested = False


def on_sigint(signum, frame):
    """SIGINT handler for the CLI: remembers the request, so an interrupt that Python swallows (one
    raised inside a weakref callback or a ``__del__`` is only printed as "Exception ignored") still stops
    the build before its output is renamed into place."""
    _record_sigint(signum, frame)
    raise KeyboardInterrupt


def _record_sigint(signum, frame):  # pylint: disable=unused-argument
    global _interrupt_requested  # pylint: disable=global-statement
    _interrupt_requested = True


def interrupt_requested() -> bool:
    return _interrupt_requested


def import_compiler():
    """Import TVM and the compiler modules with SIGINT deferred, then honour a pending interrupt.

    A KeyboardInterrupt that lands inside a C extension's module initialisation can crash the
    interpreter (a segfault in module_dealloc), so the CLI loads them first with the interrupt held back.
    """
    global _interrupt_requested  # pylint: disable=global-statement
    _interrupt_requested = False
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGINT, _record_sigint)
    try:
        import onnx  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
        import tvm  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
        from tvm import relax  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel

        from tvmq import frontend, pipeline, quantize  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, on_sigint)
    if _interrupt_requested:
        raise KeyboardInterrupt
