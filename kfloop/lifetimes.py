"""A child process's lifetime tied to its parent's: nothing kfloop starts outlives the process that started it.

:func:`die_with_parent` asks Linux to signal the calling process when the thread that started it ends
(``PR_SET_PDEATHSIG``), and ends it at once if that already happened. The local supervisor calls it in
every server it starts (:mod:`kfloop.local.supervisor`), a predictor's explain worker in itself
(:mod:`kfloop.serving.explaining`), so a parent killed with SIGKILL leaves no orphan behind.
"""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = ["die_with_parent"]

PR_SET_PDEATHSIG = 1


def die_with_parent(signal_number: int = signal.SIGTERM, *, parent: int | None = None) -> None:
    """Get ``signal_number`` when the parent dies; if ``parent`` (its pid) is already gone, get it now."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal_number)
    if parent is not None and os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal_number)
