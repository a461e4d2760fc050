"""CPU time of a JVM's just-in-time compilers (HotSpot's C1 and C2 compiler threads).

A Kafka broker or Cassandra node that has just started compiles its hot paths for the first few
thousand requests it serves, and that compilation runs on the same two cores as everything else. The
bench warms the JVMs until it has mostly stopped (:func:`bench.ingest.warm_jvms`) and reports what is
left, so a figure measures the grid as it runs for months, not its first minute.

Read from ``/proc/<pid>/task/*/stat`` (Linux): HotSpot names the threads "C1 CompilerThread0", "C2
CompilerThread1", ..., which the kernel keeps as their first 15 characters. A compiler thread the JVM
retires between two samples takes the time it spent since the last one with it (a small undercount).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

_PREFIXES = ("C1 CompilerThre", "C2 CompilerThre")


def compiler_seconds(pid: int, tids: Iterable[int] | None = None) -> dict[int, float]:
    """CPU seconds (user + system) of each live compiler thread of process ``pid``, by thread id.

    ``tids``: look only at these threads (those found before), instead of at all of the JVM's hundred
    or more.
    """
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    if tids is None:
        try:
            tasks: Iterable[int | str] = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return out
    else:
        tasks = tids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name.startswith(_PREFIXES):
            fields = stat[stat.rindex(")") + 2 :].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out
