"""Counting signals exactly: two Ctrl-C that arrive before Python runs its handler still count as two.

CPython's C-level handler only sets a flag; the Python handler runs later, between bytecodes of the main
thread, and once however many times the flag was set meanwhile (a main thread inside a long torch op, or
blocked while another thread holds the GIL, turns a quick double Ctrl-C into one). The C handler also
writes one byte per delivery to the wakeup fd (signal.set_wakeup_fd), so reading that pipe counts every
delivery the kernel made.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


class SignalTally:
    """Within `with`: `count(signum)` is the number of deliveries of `signum` so far (call it from the
    handler). Outside the main thread (no wakeup fd possible) it counts handler calls instead."""

    def __init__(self) -> None:
        self._fds: tuple[int, int] | None = None
        self._old_fd = -1
        self._counts: dict[int, int] = {}

    def __enter__(self) -> SignalTally:
        if threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._fds = (r, w)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fds is not None:
            signal.set_wakeup_fd(self._old_fd)
            for fd in self._fds:
                os.close(fd)
            self._fds = None

    def count(self, signum: int) -> int:
        """Deliveries of `signum` so far (including the one whose handler is running)."""
        if self._fds is None:
            self._counts[signum] = self._counts.get(signum, 0) + 1
            return self._counts[signum]
        while True:
            try:
                data = os.read(self._fds[0], 512)
            except BlockingIOError:
                break
            if not data:
                break
            for b in data:
                self._counts[b] = self._counts.get(b, 0) + 1
        return max(1, self._counts.get(signum, 0))
