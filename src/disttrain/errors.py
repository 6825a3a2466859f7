"""Exit codes and the one exception type that means "the user gave us bad input"."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # training failed (non-finite loss, crash, dead rank)
EXIT_USAGE = 2  # bad input: config, flags, data, checkpoint
EXIT_INTERRUPTED = 75  # stopped by a signal after writing a checkpoint; resume with --resume auto


class UsageError(Exception):
    """Bad input. Printed as one line, exit code 2, no traceback."""


class TrainingError(Exception):
    """The run itself failed (e.g. non-finite loss). Printed as one line, exit code 1.

    `restartable`: whether starting again from the last checkpoint can succeed (a peer process died or hung:
    `python -m disttrain.launch --max-restarts N` restarts the group), or would fail the same way (a
    non-finite loss, a full disk: the default, never restarted)."""

    def __init__(self, message: str, restartable: bool = False):
        super().__init__(message)
        self.restartable = restartable


MAX_LINE = 600  # characters of an error line; longer ones are cut in the middle (see cut)


def one_line(message: object) -> str:
    """Collapse a message to a single line so the first line a user sees is the whole story."""
    return " ".join(str(message).split())


def cut(message: object, limit: int = MAX_LINE) -> str:
    """one_line(message), at most `limit` characters: the middle is dropped, never the start (what was
    refused) nor the end (why: our messages end with the reason and what to do)."""
    s = one_line(message)
    if len(s) <= limit:
        return s
    head = (limit * 2) // 3
    tail = limit - head - 7
    return f"{s[:head]} [...] {s[-tail:]}"
