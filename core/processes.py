"""Names that tie a file to the process writing it, so any process can tell a dead writer's leftovers.

A tag is ``<pid>-<start time>``: the start time tells the writer from a later process that was given
its recycled pid.
"""

from __future__ import annotations

import os

import psutil

# psutil derives process start times from the boot time, which /proc/stat gives in whole seconds.
_CLOCK_SLACK_S = 1.5


def tag_of(pid: int, started: float) -> str:
    return f"{pid}-{int(started)}"


_own: str | None = None


def own_tag() -> str:
    """This process's tag (asked of the OS once: ``getpid`` is a system call, made per payload)."""
    global _own
    if _own is None:
        pid = os.getpid()
        _own = tag_of(pid, psutil.Process(pid).create_time())
    return _own


def _forget_own_tag() -> None:
    global _own
    _own = None


# A forked child is another process: it gets its own tag.
os.register_at_fork(after_in_child=_forget_own_tag)


def tag_alive(tag: str) -> bool:
    """Whether the process a tag names is still running."""
    try:
        pid, started = (int(part) for part in tag.split("-", 1))
        return abs(psutil.Process(pid).create_time() - started) <= _CLOCK_SLACK_S
    except (ValueError, psutil.Error):
        return False
