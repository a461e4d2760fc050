"""Lowering a process's CPU priority so that it yields to the services a sender waits on.

Linux's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on by default in most
distributions) shares the CPUs fairly between *sessions* first, and a nice value then only weighs a
process against the other members of its own session. Every grid service runs in a session of its own
(a detached daemon, a supervised child, a systemd unit), so ``nice`` alone would change nothing between
them: a background service that leads its session also sets the nice value of the session's autogroup.
One started from a terminal leaves it alone, since it would slow the shell and whatever else runs there.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_AUTOGROUP = Path("/proc/self/autogroup")


def lower_priority(increment: int) -> None:
    """Add ``increment`` (0-19) to this process's nice value, and to its autogroup's if it has one.

    Call it before the process starts threads: on Linux a nice value belongs to a thread, and new
    threads inherit their creator's.
    """
    if increment <= 0:
        return
    nice = os.nice(increment)
    if os.getsid(0) != os.getpid():
        return
    try:
        group = _AUTOGROUP.read_text()
        if not group.strip():
            # The kernel shows nothing for a process outside any autogroup, as when its session is
            # init's or its cgroup has its own CPU weight: the nice value is all there is to set.
            return
        current = int(group.split("nice")[1])
        if current < nice:
            _AUTOGROUP.write_text(str(nice))
    except FileNotFoundError:
        return  # no autogroup scheduling (kernel without it, other systems): the nice value is all
    except (OSError, ValueError, IndexError) as exc:
        # Raising a nice value needs no privilege; a hardened /proc may still refuse it.
        log.warning("autogroup priority not lowered", error=str(exc))
