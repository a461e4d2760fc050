"""Replication throughput: how fast site B catches up on a backlog, against Orthanc-to-Orthanc peer transfer.

**The grid** (the two-site grid of :mod:`bench.replication`): site B's replication worker is stopped (as
``dicomgrid down`` stops a service), the backlog is stored at site A with storescu over 4 associations,
and the harness waits until the fan-out has asked for every copy (``dicom.replication.requested``) and
A has indexed every instance, so nothing but replication runs afterwards. Then B's worker is started.
Its consumer group turning stable with the worker's partitions assigned is the moment it is **ready**;
the backlog is done when B's ledger holds a verified row for every payload (the last row's
``WRITETIME``). The rate counts from *ready*, since the worker's start-up (interpreter, faust, Kafka and
Cassandra connections: a few seconds whatever the backlog) is a fixed cost a backlog does not grow;
the time from the start command is reported too. CPU is sampled from *ready* on.

**The anchor**: two Orthancs with the same settings as the ingest section's (SQLite index, fsync on),
the second listed in the first's ``OrthancPeers``. The same backlog (same corpus, fresh UIDs) is stored
in the first with the same storescu; then ``POST /peers/{id}/store`` with the backlog's studies as one
asynchronous job, timed from the request until the job has succeeded and the second Orthanc's
``/statistics`` counts every instance.

Repetitions interleave the two (the order alternates); every figure is the median over repetitions.
Stores are kept until the section ends (deleting many files slows the next file creations on ext4 for
minutes, see the notes), so later repetitions write into fuller stores, the same for both.

With ``--profile``, more grid backlogs of the small corpus follow (with the configured worker, and with
the busiest variant measured), sampled by py-spy in B's worker (the replication threads' wall time by
step, GIL holders) and in A's HTTP service (GIL holders); they are not part of the table.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient

from dicomgrid import schemas
from dicomgrid.processors.replicator import replication_group

from bench import report
from bench.availability import Ledger
from bench.corpus import Corpus, RunCorpus
from bench.events import Tap
from bench.grid import TWO_SITES, BenchGrid
from bench.profiling import PROFILES, Share, parse_frame, read_raw, recording, shares, step_of
from bench.sampler import Sampler
from bench.sections import Section
from bench.session import Session
from bench.storescu import send
from bench.targets import Orthanc

MB = 1e6
ASSOCIATIONS = 4  # storescu associations that store the backlog at its first site
GOAL_RATIO = 1.0
REPLICATOR, SOURCE_HTTP = "B/replicator", "A/http"
POLL_S = 0.05
READY_TIMEOUT_S = 120.0
QUEUED_TIMEOUT_S = 300.0
PEER = "dst"  # the second Orthanc, as the first one's OrthancPeers name it


@dataclass
class BacklogRun:
    target: str  # "grid", "grid-c<N>" (B's worker with concurrency N) or "orthanc"
    corpus: str
    repetition: int
    instances: int
    bytes: int
    seconds: float  # the measured time: grid from ready, Orthanc from the request
    from_start_s: float | None  # grid: from the start command
    startup_s: float | None  # grid: start command until ready
    load_1m: float
    cpu_machine_pct: float
    cpu_seconds: dict[str, float]
    copies: int  # verified at the destination
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.copies == self.instances

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds


def _uids(corpus: Corpus, run: RunCorpus) -> set[str]:
    return {corpus.key(run.token, i).sop_instance_uid for i in range(run.count)}


def _for_b(tap: Tap, uids: set[str], field_name: str) -> list[dict[str, Any]]:
    """Events of ``tap`` about site B (``field_name`` says where the site is) for the instances ``uids``."""
    out, seen = [], set()
    for item in tap.seen:
        event = item.event
        site = event.get("target_site") if field_name == "target_site" else event.get("replica", {}).get("site")
        uid = event.get("sop_instance_uid")
        if site == "B" and uid in uids and uid not in seen:
            seen.add(uid)
            out.append(event)
    return out


def _group(admin: AdminClient, group: str) -> tuple[ConsumerGroupState | None, int]:
    """The consumer group's state and how many of its members have partitions assigned."""
    try:
        description = admin.describe_consumer_groups([group], request_timeout=5)[group].result()
    except Exception:  # the coordinator may be moving while the group forms: state unknown
        return None, 0
    return description.state, sum(1 for m in description.members if m.assignment and m.assignment.topic_partitions)


def _ready(admin: AdminClient, group: str) -> bool:
    """The worker's consumer group is stable and has its partitions assigned."""
    state, assigned = _group(admin, group)
    return state == ConsumerGroupState.STABLE and assigned > 0


def _wait(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


class GridBacklog:
    """Stop B's worker, store the backlog at A, start the worker, time it until B has verified every copy."""

    def __init__(self, session: Session, grid: BenchGrid) -> None:
        self.session = session
        self.grid = grid
        self.config = grid.config()
        self.admin = AdminClient(self.config.kafka.client_config())
        self.group = replication_group(self.config, "B")
        self.ledger = Ledger(grid, TWO_SITES.sites[1])

    def close(self) -> None:
        self.ledger.close()

    def groups(self) -> dict[str, list[psutil.Process]]:
        return {"replicator (B)": [self.grid.process(REPLICATOR)], "http (A)": [self.grid.process(SOURCE_HTTP)],
                **self.grid.jvms()}

    def run(self, corpus: Corpus, repetition: int, profile: tuple[dict[str, Path], str] | None = None,
            concurrency: int | None = None) -> BacklogRun:
        """One backlog; ``concurrency`` runs B's worker with that many transfers at once instead of the
        configured number; ``profile`` ({service: output}, mode) samples services with py-spy while the
        backlog moves."""
        site_a = TWO_SITES.sites[0]
        run = corpus.materialize(ASSOCIATIONS)
        uids = _uids(corpus, run)
        requests = Tap(self.config, schemas.TOPIC_REPLICATION_REQUESTED)
        copies = Tap(self.config, schemas.TOPIC_REPLICA_STORED)
        try:
            self._stop_worker()
            sent = send(run.parts, site_a.ae_title, self.grid.ports[site_a.name].dicom, self.session.log_dir)
            if sent.failures:
                raise RuntimeError(f"backlog not stored at site A: {sent.failures[0]}")
            if not requests.until(lambda _: len(_for_b(requests, uids, "target_site")) >= run.count,
                                  QUEUED_TIMEOUT_S):
                raise RuntimeError(f"fan-out asked for {len(_for_b(requests, uids, 'target_site'))}/{run.count} "
                                   f"copies within {QUEUED_TIMEOUT_S:.0f} s")
            indexed = self.grid.wait_indexed(run, sent)
            if indexed.stored != run.count:
                raise RuntimeError(f"backlog not indexed at site A: {indexed}")
            self.session.settle()
            jvms = self.grid.refresh_jvms()
            load = os.getloadavg()[0]
            started = time.time()
            self.grid.start_service(REPLICATOR, f"[replication]\nconcurrency = {concurrency}\n" if concurrency else "")
            if not _wait(lambda: _ready(self.admin, self.group), READY_TIMEOUT_S):
                raise RuntimeError(f"B's replication worker not in its consumer group after {READY_TIMEOUT_S:.0f} s")
            ready = time.time()
            timeout = 120.0 + run.count / 10
            with ExitStack() as stack:
                if profile is not None:
                    outputs, mode = profile
                    for service, output in outputs.items():
                        stack.enter_context(recording(self.grid.process(service).pid, output, mode))
                with Sampler(self.groups) as sampler:
                    copies.until(lambda _: len(_for_b(copies, uids, "replica")) >= run.count, timeout)
                    sampler.sent()
            made = _for_b(copies, uids, "replica")
            written = self.ledger.verified_written_many([e["replica"]["sha256"] for e in made])
            deadline = time.monotonic() + 10
            while len(written) < len(made) and time.monotonic() < deadline:
                time.sleep(0.2)
                written = self.ledger.verified_written_many([e["replica"]["sha256"] for e in made])
            last = max(written.values(), default=time.time())
            notes = [] if len(written) == run.count else [f"{len(written)}/{run.count} verified at B within {timeout:.0f} s"]
            if self.grid.refresh_jvms() != jvms:
                notes.append("a cluster node restarted during the run: its CPU is not fully counted")
            return BacklogRun(
                grid_key(concurrency), corpus.spec.name, repetition, run.count, sum(e["replica"]["size"] for e in made),
                last - ready, last - started, ready - started, round(load, 2), sampler.usage.cpu_machine_pct,
                {k: round(v, 3) for k, v in sampler.usage.cpu_seconds.items()}, len(written), "; ".join(notes),
            )
        finally:
            requests.close()
            copies.close()
            run.remove()
            if self.grid.process_or_none(REPLICATOR) is None:
                self.grid.start_service(REPLICATOR)


    def _stop_worker(self) -> None:
        """Stop B's worker once it is in its group, and wait until the group is empty.

        A worker stopped while it is still joining can leave its member behind until the session
        times out; the next worker's join then waits for that, and "ready" would be the old member.
        """
        if not _wait(lambda: _ready(self.admin, self.group), READY_TIMEOUT_S):
            raise RuntimeError(f"B's replication worker not in its consumer group after {READY_TIMEOUT_S:.0f} s")
        self.grid.stop_service(REPLICATOR)
        if not _wait(lambda: _group(self.admin, self.group)[0] in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD),
                     READY_TIMEOUT_S):
            raise RuntimeError(f"B's stopped replication worker still in its consumer group after {READY_TIMEOUT_S:.0f} s")


def grid_key(concurrency: int | None) -> str:
    return "grid" if concurrency is None else f"grid-c{concurrency}"


class OrthancPeers:
    """Two Orthancs, the second a peer of the first; a backlog is moved by ``POST /peers/{id}/store``."""

    def __init__(self) -> None:
        self.dst = Orthanc("orthanc-peer-dst")
        self.src = Orthanc("orthanc-peer-src", OrthancPeers={PEER: [self.dst.url + "/"]})
        self.http = httpx.Client(timeout=60, trust_env=False)

    def start(self) -> None:
        self.dst.start()
        self.src.start()

    def stop(self) -> None:
        self.http.close()
        self.src.stop()
        self.dst.stop()

    def groups(self) -> dict[str, list[psutil.Process]]:
        return {"orthanc (sender)": self.src.groups()["orthanc"], "orthanc (receiver)": self.dst.groups()["orthanc"]}

    def describe(self) -> dict[str, Any]:
        return self.src.describe()

    def _studies(self, run: RunCorpus) -> list[str]:
        ids = []
        for study_uid in run.study_uids:
            found = self.http.post(f"{self.src.url}/tools/lookup", content=study_uid).json()
            ids += [r["ID"] for r in found if r.get("Type") == "Study"]
        if len(ids) != len(run.study_uids):
            raise RuntimeError(f"Orthanc holds {len(ids)}/{len(run.study_uids)} of the backlog's studies")
        return ids

    def run(self, session: Session, corpus: Corpus, repetition: int) -> BacklogRun:
        run = corpus.materialize(ASSOCIATIONS)
        try:
            before_src = self.src.statistics()["CountInstances"]
            sent = send(run.parts, self.src.ae_title, self.src.port, session.log_dir)
            if sent.failures or self.src.statistics()["CountInstances"] - before_src != run.count:
                raise RuntimeError(f"backlog not stored in the first Orthanc: {sent.failures[:1]}")
            studies = self._studies(run)
            before = int(self.dst.statistics()["CountInstances"])
            session.settle()
            load = os.getloadavg()[0]
            with Sampler(self.groups) as sampler:
                started = time.time()
                job = self.http.post(f"{self.src.url}/peers/{PEER}/store",
                                     json={"Resources": studies, "Asynchronous": True}).json()["ID"]
                while True:
                    state = self.http.get(f"{self.src.url}/jobs/{job}").json()
                    if state["State"] == "Success":
                        break
                    if state["State"] in ("Failure", "Paused"):
                        raise RuntimeError(f"Orthanc peer store job {job}: {state['State']} {state.get('ErrorDescription')}")
                    time.sleep(POLL_S / 2)
                stored = int(self.dst.statistics()["CountInstances"]) - before
                while stored < run.count and time.time() - started < 600:
                    time.sleep(POLL_S)
                    stored = int(self.dst.statistics()["CountInstances"]) - before
                done = time.time()
                sampler.sent()
            return BacklogRun("orthanc", corpus.spec.name, repetition, run.count, run.total_bytes, done - started,
                              None, None, round(load, 2), sampler.usage.cpu_machine_pct,
                              {k: round(v, 3) for k, v in sampler.usage.cpu_seconds.items()}, stored,
                              "" if stored == run.count else f"{stored}/{run.count} at the peer")
        finally:
            run.remove()


@dataclass
class Row:
    corpus: str
    target: str
    label: str
    runs: int
    ok: bool
    instances: int
    megabytes: float
    seconds: float
    instances_per_s: float
    spread_pct: float
    mb_per_s: float
    from_start_s: float | None
    startup_s: float | None
    cpu_machine_pct: float
    load_1m: float
    cpu_ms_per_instance: dict[str, float]
    ratio: float | None = None  # instances/s over Orthanc's


def median_row(label: str, mine: list[BacklogRun]) -> Row:
    first = mine[0]
    rates = [r.instances_per_s for r in mine]

    def median_or_none(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 2) if present else None

    groups = sorted({g for r in mine for g in r.cpu_seconds})
    return Row(
        first.corpus, first.target, label, len(mine), all(r.ok for r in mine), first.instances,
        round(first.bytes / MB, 1), round(statistics.median(r.seconds for r in mine), 2),
        round(statistics.median(rates), 1), round(100 * (max(rates) - min(rates)) / statistics.median(rates), 1),
        round(statistics.median(r.bytes / MB / r.seconds for r in mine), 1),
        median_or_none([r.from_start_s for r in mine]), median_or_none([r.startup_s for r in mine]),
        round(statistics.median(r.cpu_machine_pct for r in mine), 1),
        round(statistics.median(r.load_1m for r in mine), 2),
        {g: round(statistics.median(1000 * r.cpu_seconds.get(g, 0.0) / r.instances for r in mine), 2) for g in groups},
    )


ORTHANC_LABEL = "Orthanc -> Orthanc (`/peers/{id}/store`)"


def grid_label(concurrency: int | None, shipped: int) -> str:
    if concurrency is None:
        return f"dicomgrid (B's worker catching up from A; concurrency {shipped}, as shipped)"
    return f"dicomgrid, B's worker at concurrency {concurrency}"

# Steps of a replication request in B's worker threads, by the innermost frame that names one.
REPLICATOR_STEPS = [
    ("BlobWriter.commit", "core/blobstore.py", "commit: rename, fsync, fsync directory"),
    ("BlobWriter.write", "core/blobstore.py", "write received bytes + SHA-256"),
    ("BlobWriter.__init__", "core/blobstore.py", "open and lock the resumable temp file"),
    ("BlobStore.verify", "core/blobstore.py", "look for a held copy (hash it if present)"),
    ("EventPublisher.publish_and_wait", "core/kafka.py", "wait for Kafka acks=all (dicom.replica.stored)"),
    ("ReplicaLedger.record", "core/ledger.py", "ledger write (Cassandra)"),
    ("ReplicaLedger.replicas", "core/ledger.py", "ledger read (Cassandra)"),
    ("AuditTrail.record", "core/audit.py", "audit record"),
    ("replica_stored", "core/events.py", "build event"),
    ("PayloadTransfer._stream_into", "core/transfer.py", "HTTP GET from A (request, response, body)"),
    ("Replicator.handle", "processors/replicator.py", "handler: other"),
]
IDLE = "idle (no request to work on)"


@dataclass
class GilProfile:
    """Who held a process's GIL during a profiled backlog."""

    busy_pct: float = 0.0  # ticks with a holder / ticks of the run
    by_thread: list[Share] = field(default_factory=list)
    top_frames: list[Share] = field(default_factory=list)  # inclusive
    top_self: list[Share] = field(default_factory=list)  # innermost frame


@dataclass
class ReplicatorProfile:
    instances: int
    seconds: float
    wall_steps: list[Share] = field(default_factory=list)  # B's replication threads' time, per step
    worker: GilProfile = field(default_factory=GilProfile)  # B's replication worker
    source: GilProfile = field(default_factory=GilProfile)  # A's HTTP service, serving the payloads


def _thread_role(thread: str) -> str:
    name = thread.split(": ", 1)[-1].strip('"')
    if name.startswith("replication"):
        return "replication threads (requests)"
    if name == "MainThread":
        return "event loop"
    if name.startswith("AnyIO worker thread"):
        return "AnyIO worker threads (file reads, hashing)"
    if name.startswith(("ThreadPoolExecutor", "Task Scheduler", "event_loop", "Connection heartbeat")):
        return "Cassandra driver / default executor"
    return name or "other"


_WRAPPERS = ("threading.py", "concurrent/futures/thread.py", "<frozen runpy>", "click/", "asyncio/")


def gil_profile(path: Path, instances: int, seconds: float) -> GilProfile:
    from bench.profiling import RATE_HZ

    per_instance = 1.0 / RATE_HZ / instances
    by_thread: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    innermost: Counter[str] = Counter()
    held = 0
    for thread, frames, count in read_raw(path):
        held += count
        by_thread[_thread_role(thread)] += count
        if frames:
            innermost[frames[-1]] += count
        for frame in set(frames):
            if not any(w in parse_frame(frame)[1] for w in _WRAPPERS):
                inclusive[frame] += count
    return GilProfile(round(100 * held / (seconds * RATE_HZ), 1) if seconds else 0.0,
                      shares(by_thread, held or 1, per_instance),
                      shares(inclusive, held or 1, per_instance, limit=15),
                      shares(innermost, held or 1, per_instance, limit=10))


def summarize_replicator(wall: Path, gil: Path, instances: int, wall_s: float, gil_s: float,
                         source_gil: Path | None = None) -> ReplicatorProfile:
    """B's worker's wall profile split by step, and the GIL profiles of B's worker and A's HTTP service."""
    from bench.profiling import RATE_HZ

    per_instance = 1.0 / RATE_HZ / instances
    out = ReplicatorProfile(instances, round(wall_s, 2))
    steps: Counter[str] = Counter()
    for thread, frames, count in read_raw(wall):
        if _thread_role(thread).startswith("replication"):
            steps[step_of(frames, REPLICATOR_STEPS, IDLE)] += count
    out.wall_steps = shares(steps, sum(steps.values()) or 1, per_instance)
    out.worker = gil_profile(gil, instances, gil_s)
    if source_gil is not None:
        out.source = gil_profile(source_gil, instances, gil_s)
    return out


def _profile(backlog: GridBacklog, corpus: Corpus, concurrency: int | None) -> tuple[ReplicatorProfile, dict[str, str]]:
    """Two more backlogs, one sampled for wall time, one for GIL holders (B's worker and A's HTTP service)."""
    directory = PROFILES / time.strftime("%Y-%m-%dT%H-%M-%S")
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    seconds, instances = {}, 0
    for mode in ("wall", "gil"):
        outputs = {REPLICATOR: directory / f"replicator-{grid_key(concurrency)}-{mode}.txt",
                   SOURCE_HTTP: directory / f"source-http-{grid_key(concurrency)}-{mode}.txt"}
        paths.update({f"{service}:{mode}": path for service, path in outputs.items()})
        result = backlog.run(corpus, 0, profile=(outputs, mode), concurrency=concurrency)
        if not result.ok:
            raise RuntimeError(f"profiled backlog incomplete: {result.note}")
        seconds[mode], instances = result.seconds, result.instances
    summary = summarize_replicator(paths[f"{REPLICATOR}:wall"], paths[f"{REPLICATOR}:gil"], instances,
                                   seconds["wall"], seconds["gil"], paths[f"{SOURCE_HTTP}:gil"])
    return summary, {k: str(v) for k, v in paths.items()}


def _render_profile(p: ReplicatorProfile, raw: dict[str, str], label: str) -> str:
    def rows(items: list[Share], code: bool = False) -> list[list[str]]:
        return [[f"`{s.name}`" if code else s.name, f"{s.pct:.1f}%", f"{s.ms_per_instance:.2f}"] for s in items]

    def gil(title: str, g: GilProfile) -> str:
        return (
            f"\n{title}: the GIL was held during {g.busy_pct:.0f}% of the run. GIL-holding samples by thread:\n\n"
            + report.table(["thread", "share of GIL-held samples", "ms per instance"], rows(g.by_thread))
            + "\nTop frames while holding the GIL (inclusive, then innermost):\n\n"
            + report.table(["frame", "inclusive", "ms per instance"], rows(g.top_frames, True)) + "\n"
            + report.table(["frame", "self", "ms per instance"], rows(g.top_self, True))
        )

    return (
        f"### Where a backlog's time goes: {label} (py-spy, {p.instances} small instances, not in the table)\n\n"
        f"Wall time of B's replication threads, per step ({p.instances} instances in {p.seconds:.2f} s; "
        "ms per instance summed over the threads, which work on several requests at once; *HTTP GET* includes "
        "the time A takes to answer):\n\n"
        + report.table(["step", "share", "ms per instance"], rows(p.wall_steps))
        + gil("B's replication worker", p.worker)
        + gil("A's HTTP service (serving the payloads)", p.source)
        + "\nRaw profiles (py-spy raw format): " + ", ".join(f"`{v}`" for v in raw.values()) + ".\n"
    )


def _render(session: Session, rows: list[Row], goals: list[dict[str, Any]], profile: str) -> str:
    corpora = ", ".join(f"**{c.name}**: {c.count} CT images {c.rows}x{c.columns} 16-bit in {c.studies} studies"
                        for c in session.options.backlog_corpora)
    main = report.table(
        ["backlog", "target", "instances", "MB", "s", "inst/s", "spread", "MB/s", "grid/Orthanc",
         "grid from start command: s (start-up s)", "machine CPU", "load"],
        [[r.corpus, r.label + ("" if r.ok else " (INCOMPLETE)"), r.instances, f"{r.megabytes:.0f}",
          f"{r.seconds:.2f}", f"{r.instances_per_s:.0f}", f"{r.spread_pct:.0f}%", f"{r.mb_per_s:.1f}",
          report.ratio(r.ratio),
          "-" if r.from_start_s is None else f"{r.from_start_s:.2f} ({r.startup_s:.2f})",
          f"{r.cpu_machine_pct:.0f}%", f"{r.load_1m:.2f}"] for r in rows])
    groups = [g for g in ("replicator (B)", "http (A)", "orthanc (sender)", "orthanc (receiver)", "kafka",
                          "cassandra-dc1", "cassandra-dc2") if any(g in r.cpu_ms_per_instance for r in rows)]
    cpu = report.table(["backlog", "target", *groups],
                       [[r.corpus, r.label, *[f"{r.cpu_ms_per_instance[g]:.2f}" if g in r.cpu_ms_per_instance else "-"
                                              for g in groups]] for r in rows])
    goal_table = report.table(["goal", "measured", "met"],
                              [[g["goal"], report.ratio(g["measured"]), "yes" if g["met"] else "**no**"] for g in goals])
    return (
        f"Backlogs: {corpora}, stored at the first site with `storescu` over {ASSOCIATIONS} associations (fresh UIDs "
        f"every run). {session.options.repetitions} repetition(s), interleaved, medians; *spread* is "
        "(max - min) / median of inst/s.\n\n"
        "- **dicomgrid**: site B's replication worker is stopped, the backlog is stored at A and queued "
        "(every `dicom.replication.requested` published, every instance indexed at A), then B's worker is "
        "started. Timed from the worker being **ready** (its consumer group stable, partitions assigned) until "
        "B's ledger has a verified row for every payload (the last row's `WRITETIME`); the last column times it "
        "from the start command instead, start-up in brackets. Worker settings as shipped (no bandwidth cap), "
        "and in further rows with more transfers at once (`[replication] concurrency`) for B's worker only.\n"
        "- **Orthanc**: two Orthancs (SQLite index, `SyncStorageArea: true`), the second in the first's "
        "`OrthancPeers`; `POST /peers/{id}/store` with the backlog's studies, `Asynchronous: true`, timed from "
        "the request until the job succeeded and the peer's `/statistics` counted every instance.\n\n"
        f"{main}\n"
        "*MB*: payload bytes moved. *machine CPU*: both cores while the backlog moved (100% = both busy); *load*: "
        "1-minute load average before it (other engineers' tests may share the machine and its Kafka and "
        "Cassandra).\n\n"
        "CPU ms per instance by process, while the backlog moved (grid: from *ready*):\n\n"
        f"{cpu}\n### Goal\n\n{goal_table}\n" + profile
    )


class BacklogScenario:
    key = "replication-backlog"
    title = "Replication throughput: a backlog caught up, grid vs Orthanc-to-Orthanc peer transfer"

    def run(self, session: Session) -> Section:
        grid = session.sites_grid()
        shipped = grid.config().replication.concurrency
        variants: list[int | None] = [None, *(n for n in session.options.backlog_concurrency if n != shipped)]
        orthanc = OrthancPeers()
        backlog = GridBacklog(session, grid)
        runs: list[BacklogRun] = []
        profile_md, profile_data = "", {}
        with ExitStack() as stack:
            stack.callback(backlog.close)
            orthanc.start()
            stack.callback(orthanc.stop)
            for spec in session.options.backlog_corpora:
                corpus = session.corpus(spec)
                for repetition in range(1, session.options.repetitions + 1):
                    order: list[int | None | str] = [*variants, "orthanc"]
                    if repetition % 2 == 0:
                        order.reverse()
                    for target in order:
                        runs.append(orthanc.run(session, corpus, repetition) if target == "orthanc"
                                    else backlog.run(corpus, repetition, concurrency=target))  # type: ignore[arg-type]
            if session.options.profile:
                # The configured worker, and the busiest variant: where waiting turns into work.
                small = session.corpus(session.options.backlog_corpora[0])
                for concurrency in dict.fromkeys([None, variants[-1]]):
                    summary, raw = _profile(backlog, small, concurrency)
                    profile_md += _render_profile(summary, raw, grid_label(concurrency, shipped))
                    profile_data[grid_key(concurrency)] = {**asdict(summary), "raw": raw}
            orthanc_described = orthanc.describe()
        rows = []
        for spec in session.options.backlog_corpora:
            mine = [r for r in runs if r.corpus == spec.name]
            reference = median_row(ORTHANC_LABEL, [r for r in mine if r.target == "orthanc"])
            for concurrency in variants:
                row = median_row(grid_label(concurrency, shipped), [r for r in mine if r.target == grid_key(concurrency)])
                row.ratio = round(row.instances_per_s / reference.instances_per_s, 2)
                rows.append(row)
            rows.append(reference)
        goals = [{"goal": f"grid >= {GOAL_RATIO:.1f}x Orthanc peer transfer ({r.corpus})", "corpus": r.corpus,
                  "measured": r.ratio, "met": r.ok and r.ratio is not None and r.ratio >= GOAL_RATIO}
                 for r in rows if r.target == "grid"]
        data = {"rows": [asdict(r) for r in rows], "goals": goals, "runs": [asdict(r) for r in runs],
                "shipped_concurrency": shipped, "orthanc": orthanc_described, "profile": profile_data}
        summary_lines = [f"{r.corpus}: {r.label}: {r.instances_per_s:.0f} inst/s ({r.mb_per_s:.1f} MB/s), "
                         f"{report.ratio(r.ratio)} Orthanc peer transfer" for r in rows if r.target.startswith("grid")]
        return Section(self.key, self.title, True, _render(session, rows, goals, profile_md), data,
                       summary=summary_lines)
