"""Where a grid receiver's time goes: py-spy samples taken during one single-association run.

Two recordings of the same kind of run:

* **wall** (``--idle``): every thread at every tick, waiting or not. The association thread runs the
  C-STORE handler, so its samples split one instance's latency into steps (parse, write, fsync, wait for
  Kafka, ...) plus the time it waits for the next data set to arrive.
* **gil** (``--gil``): only the thread holding the GIL, i.e. the Python work a receiver process can do
  at most one of at a time. The share of ticks with any holder is how busy the GIL was.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import report
from bench.paths import BENCH_ROOT
from bench.sections import Section
from bench.session import Session

RATE_HZ = 100
PROFILES = BENCH_ROOT / "profiles"
PY_SPY = Path(sys.executable).parent / "py-spy"

# Thread roles, by the names pynetdicom, the grid and the Cassandra driver give their threads.
_ROLES = [
    (re.compile(r"\(process_request_thread\)$"), "association (storage path)"),
    (re.compile(r"^AcceptorThread@"), "association (C-STORE handler)"),
    (re.compile(r"\(run_reactor\)$"), "DUL (reads PDUs, spools the data set)"),
    (re.compile(r"^kafka-delivery$"), "Kafka delivery reports"),
    (re.compile(r"^(event_loop|Connection heartbeat|Task Scheduler|ThreadPoolExecutor-.*)$"), "Cassandra driver"),
]
# The frames of an association that stores: the storage path's, or pynetdicom's C-STORE handler.
STORE_HANDLERS = ("StoragePath.serve (", "StorageService.on_store (")

# Steps of the handler, matched on the innermost frame that names one (function, file suffix).
_STEPS = [
    ("EventPublisher.publish_and_wait", "core/kafka.py", "wait for Kafka acks=all"),
    ("BlobWriter.commit", "core/blobstore.py", "blob: rename, fsync, fsync directory"),
    ("BlobWriter.copy_from", "core/blobstore.py", "blob: copy spooled data set + SHA-256"),
    ("BlobWriter.write", "core/blobstore.py", "blob: write data set fragment + SHA-256"),
    ("BlobWriter.reopen", "core/blobstore.py", "blob: reopen temp file to check it"),
    ("BlobStore.writer", "core/blobstore.py", "blob: create/remove temp file"),
    ("BlobWriter.__init__", "core/blobstore.py", "blob: create/remove temp file"),
    ("canonical_file_meta", "core/dicomfile.py", "build canonical file meta"),
    ("split_file_meta", "core/dicomfile.py", "parse file meta (pydicom)"),
    ("_attributes", "core/dicomfile.py", "decode index attributes (pydicom)"),
    ("read_index_attributes", "core/dicomfile.py", "parse index attributes (pydicom dcmread, deflated only)"),
    ("_walk", "core/dicomfile.py", "walk element headers, keep indexed values"),
    ("BlobStore.is_announced", "core/blobstore.py", "blob: identical-resend check (xattr)"),
    ("BlobStore.mark_announced", "core/blobstore.py", "blob: mark announced (xattr)"),
    ("Ingestor.report", "producers/ingest.py", "audit event + log line"),
    ("instance_stored", "core/events.py", "build event"),
    ("StorageService.on_store", "producers/storage_scp.py", "handler: other"),
    ("_PDUReader._fill", "producers/storage_path.py", "waiting for the next PDU (network)"),
    ("_Association._send", "producers/storage_path.py", "send C-STORE-RSP"),
    ("_Association.run", "producers/storage_path.py", "storage path: PDU and command handling"),
    ("StorageServiceClass.SCP", "pynetdicom/service_class.py", "pynetdicom: C-STORE request/response"),
]
WAITING = "waiting for the next data set (network + DUL thread)"
_WRAPPERS = ("threading.py", "click/", "<frozen runpy>", "dicomgrid/__main__.py", "concurrent/futures/thread.py")


@contextmanager
def recording(pid: int, output: Path, mode: str) -> Iterator[None]:
    """Sample ``pid`` with py-spy while the block runs (``mode``: "wall" or "gil")."""
    flag = "--idle" if mode == "wall" else "--gil"
    argv = [str(PY_SPY), "record", "-p", str(pid), "-f", "raw", "-o", str(output), "-r", str(RATE_HZ),
            "--nolineno", "--threads", flag]
    spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert spy.stdout is not None
    first = spy.stdout.readline().decode(errors="replace")
    if "Sampling process" not in first:  # py-spy announces that it is sampling before the first tick
        spy.kill()
        rest = spy.communicate()[0].decode(errors="replace")
        raise RuntimeError(f"py-spy could not attach to pid {pid}: {(first + rest).strip()}")
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        out = spy.communicate(timeout=60)[0].decode(errors="replace")
        if not output.exists():
            raise RuntimeError(f"py-spy wrote no profile: {out.strip()}")


def parse_frame(text: str) -> tuple[str, str]:
    """("Func.name", "pkg/file.py") of a py-spy frame "Func.name (pkg/file.py)"."""
    name, _, where = text.rpartition(" (")
    return name, where.rstrip(")")


def _role(thread: str) -> str:
    name = thread.split(": ", 1)[-1]
    return next((role for pattern, role in _ROLES if pattern.search(name)), "other")


def step_of(frames: list[str], steps: list[tuple[str, str, str]] = _STEPS, otherwise: str = WAITING) -> str:
    """The step of the innermost frame that ``steps`` names ((function, file suffix, step) each)."""
    parsed = [parse_frame(f) for f in reversed(frames)]
    for name, where in parsed:
        for function, suffix, step in steps:
            if (name == function or name.startswith(function + ".")) and where.endswith(suffix):
                return step
    return otherwise


def read_raw(path: Path) -> list[tuple[str, list[str], int]]:
    """(thread, frames outermost first, samples) of each stack of a py-spy raw profile."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        stacks.append((thread, frames, int(count)))
    return stacks


@dataclass
class Share:
    name: str
    pct: float  # of the total given in the summary
    ms_per_instance: float


@dataclass
class ProfileSummary:
    instances: int
    seconds: float
    wall_steps: list[Share] = field(default_factory=list)  # the association thread's time
    gil_busy_pct: float = 0.0  # ticks with a GIL holder / ticks of the run
    gil_by_thread: list[Share] = field(default_factory=list)
    gil_top_frames: list[Share] = field(default_factory=list)  # inclusive, of GIL-held ticks
    gil_top_self: list[Share] = field(default_factory=list)  # innermost frame, of GIL-held ticks

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def shares(counter: Counter[str], total: int, per_instance_s: float, limit: int | None = None) -> list[Share]:
    return [
        Share(name, round(100 * n / total, 1), round(1000 * n * per_instance_s, 2))
        for name, n in counter.most_common(limit)
    ]


def summarize(wall: Path, gil: Path, instances: int, wall_seconds: float, gil_seconds: float) -> ProfileSummary:
    """Break down the wall profile's association thread and the GIL profile's holders.

    Each run sent ``instances`` in its ``*_seconds``; the GIL's busy share is its samples over the ticks
    of the GIL run's sending window (idle receivers hold the GIL almost never outside it).
    """
    tick_s = 1.0 / RATE_HZ
    per_instance = tick_s / instances
    summary = ProfileSummary(instances, round(wall_seconds, 2))

    stacks = read_raw(wall)
    # Only associations that stored something: a TCP health probe also gets an association thread.
    storing = {thread for thread, frames, _ in stacks if any(f.startswith(STORE_HANDLERS) for f in frames)}
    steps: Counter[str] = Counter()
    for thread, frames, count in stacks:
        if thread in storing:
            steps[step_of(frames)] += count
    summary.wall_steps = shares(steps, sum(steps.values()) or 1, per_instance)

    by_thread: Counter[str] = Counter()
    frames_inclusive: Counter[str] = Counter()
    frames_self: Counter[str] = Counter()
    held = 0
    for thread, frames, count in read_raw(gil):
        held += count
        by_thread[_role(thread)] += count
        if frames:
            frames_self[frames[-1]] += count
        for frame in set(frames):
            if not any(w in parse_frame(frame)[1] for w in _WRAPPERS):
                frames_inclusive[frame] += count
    ticks = gil_seconds * RATE_HZ
    summary.gil_busy_pct = round(100 * held / ticks, 1) if ticks else 0.0
    summary.gil_by_thread = shares(by_thread, held or 1, per_instance)
    summary.gil_top_frames = shares(frames_inclusive, held or 1, per_instance, limit=20)
    summary.gil_top_self = shares(frames_self, held or 1, per_instance, limit=12)
    return summary


def _render(summary: ProfileSummary, receivers: int, wall_path: Path, gil_path: Path) -> str:
    per_instance = 1000 * summary.seconds / summary.instances
    steps = ", ".join(f"{s.name} {s.pct:.0f}%" for s in summary.wall_steps[:5])
    return (
        f"One grid receiver process ({receivers} receiver), one association, {summary.instances} small instances "
        f"in {summary.seconds:.2f} s ({per_instance:.1f} ms per instance), sampled by py-spy at {RATE_HZ} Hz "
        f"(the profiled runs are not part of the ingest table).\n\n"
        f"**Largest steps of the association thread:** {steps}.\n\n"
        "Wall-clock time of the association thread (the C-STORE handler runs on it), per step:\n\n"
        + report.table(["step", "share", "ms per instance"],
                       [[s.name, f"{s.pct:.1f}%", f"{s.ms_per_instance:.2f}"] for s in summary.wall_steps])
        + f"\nThe GIL was held during {summary.gil_busy_pct:.0f}% of the run. GIL-holding samples by thread:\n\n"
        + report.table(["thread", "share of GIL-held samples", "ms per instance"],
                       [[s.name, f"{s.pct:.1f}%", f"{s.ms_per_instance:.2f}"] for s in summary.gil_by_thread])
        + "\nTop frames while holding the GIL (inclusive):\n\n"
        + report.table(["frame", "inclusive", "ms per instance"],
                       [[f"`{s.name}`", f"{s.pct:.1f}%", f"{s.ms_per_instance:.2f}"] for s in summary.gil_top_frames])
        + "\nInnermost frames while holding the GIL (self time):\n\n"
        + report.table(["frame", "self", "ms per instance"],
                       [[f"`{s.name}`", f"{s.pct:.1f}%", f"{s.ms_per_instance:.2f}"] for s in summary.gil_top_self])
        + f"\nRaw profiles (py-spy raw format): `{wall_path}`, `{gil_path}`.\n"
    )


class ReceiveProfileScenario:
    key = "profile"
    title = "Where the grid's receive time goes (py-spy)"

    def run(self, session: Session) -> Section:
        from bench.ingest import run_once, warm_up  # the profile reuses the ingest runs' mechanics

        if not session.options.profile:
            return Section(self.key, self.title, False, "Skipped (--no-profile).\n", {"status": "skipped"})
        target = next(t for t in session.targets if t.key == "grid")
        warm_up(session, target)
        pid = target.groups()["receivers"][0].pid
        directory = PROFILES / time.strftime("%Y-%m-%dT%H-%M-%S")
        directory.mkdir(parents=True, exist_ok=True)
        corpus = session.corpora[0]
        paths, seconds, instances = {}, {}, 0
        for mode in ("wall", "gil"):
            paths[mode] = directory / f"receiver-{mode}.txt"
            result = run_once(session, target, corpus, 1, 0, around_send=lambda: recording(pid, paths[mode], mode))
            if not result.ok:
                raise RuntimeError(f"profiled run failed: {result.failures or result.note}")
            seconds[mode] = result.seconds
            instances = result.instances
        summary = summarize(paths["wall"], paths["gil"], instances, seconds["wall"], seconds["gil"])
        data = {**summary.as_dict(), "raw": {k: str(v) for k, v in paths.items()}, "seconds": seconds}
        return Section(self.key, self.title, True, _render(summary, 1, paths["wall"], paths["gil"]), data)
