"""Resource use during one run: whole-machine CPU, and peak RSS and CPU time per group of processes.

A group ("receivers", "kafka", ...) is a list of processes. Its RSS is summed over the processes and
their live children (storescp forks one child per association), so its peak is the most memory it held
at one moment. Its CPU time is that of the processes plus their reaped children, so the short-lived
children of storescp count without being sampled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from bench.jit import compiler_seconds

# Called at every sample: a group's processes can change during a run.
Groups = Callable[[], dict[str, list[psutil.Process]]]

INTERVAL_S = 0.1
_JIT_RESCAN = 10  # samples


@dataclass
class Usage:
    cpu_machine_pct: float = 0.0  # mean while sending, 100 = every core busy
    peak_rss: dict[str, int] = field(default_factory=dict)  # bytes, by group
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # user + system, by group
    # Of cpu_seconds, what the JVMs' JIT compilers took (groups of JVMs only; bench.jit).
    jit_seconds: dict[str, float] = field(default_factory=dict)


def _rss(proc: psutil.Process) -> int:
    total = 0
    try:
        for member in [proc, *proc.children(recursive=True)]:
            try:
                total += member.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def _cpu(proc: psutil.Process) -> float | None:
    try:
        t = proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return None


class Sampler:
    """Use as a context manager around a run; call :meth:`sent` when the senders are done."""

    def __init__(self, groups: Groups) -> None:
        self._groups = groups
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self.usage = Usage()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._members: dict[str, set[int]] = {}
        # JIT compiler threads' CPU by (pid, tid): first and last seen, for the JVMs only.
        self._jit_first: dict[tuple[int, int], float] = {}
        self._jit_last: dict[tuple[int, int], float] = {}
        self._jit_members: dict[str, set[int]] = {}
        self._samples = 0

    def __enter__(self) -> "Sampler":
        psutil.cpu_percent(interval=None)
        self._sample()
        self._first = dict(self._last)
        self._jit_first = dict(self._jit_last)
        self._thread.start()
        return self

    def sent(self) -> None:
        """End of the sending window: the machine's CPU share is measured over it."""
        self.usage.cpu_machine_pct = psutil.cpu_percent(interval=None)

    def cpu_so_far(self) -> dict[str, float]:
        """CPU seconds by group from the start until now (for a window that ends before the block does)."""
        self._sample()
        return self._cpu_seconds()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.usage.cpu_seconds = self._cpu_seconds()
        self.usage.jit_seconds = {
            group: sum(v - self._jit_first.get(key, 0.0) for key, v in self._jit_last.items() if key[0] in pids)
            for group, pids in self._jit_members.items()
        }

    def _cpu_seconds(self) -> dict[str, float]:
        return {
            group: sum(self._last[pid] - self._first.get(pid, 0.0) for pid in pids if pid in self._last)
            for group, pids in list(self._members.items())
        }

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        # A JVM's threads are listed again once a second (compiler threads come and go); in between,
        # only the compiler threads already found are read.
        full = self._samples % _JIT_RESCAN == 0
        self._samples += 1
        for group, procs in self._groups().items():
            self.usage.peak_rss[group] = max(sum(_rss(p) for p in procs), self.usage.peak_rss.get(group, 0))
            members = self._members.setdefault(group, set())
            for proc in procs:
                value = _cpu(proc)
                if value is not None:
                    members.add(proc.pid)
                    self._last[proc.pid] = value
                if _is_jvm(proc):
                    self._jit_members.setdefault(group, set()).add(proc.pid)
                    known = None if full else [tid for pid, tid in self._jit_last if pid == proc.pid]
                    for tid, seconds in compiler_seconds(proc.pid, known).items():
                        self._jit_last[(proc.pid, tid)] = seconds


def _is_jvm(proc: psutil.Process) -> bool:
    try:
        return proc.name() == "java"
    except psutil.Error:
        return False
