"""Ingest throughput: the same storescu sends the same corpora to every target, 1 and N associations.

Repetitions interleave the targets (the order rotates each repetition) so that drifts of a shared
machine spread over all of them; every figure is the median over repetitions. A run counts only if every
instance was stored (and, for the grid, indexed).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from bench import report
from bench.corpus import Corpus
from bench.machine import other_grid_services
from bench.paths import BENCH_ROOT
from bench.sampler import Sampler
from bench.sections import Section
from bench.session import Session
from bench.storescu import OPTIONS as STORESCU_OPTIONS
from bench.storescu import send
from bench.targets import MAX_PDU, Target

MB = 1e6
REFERENCES = ("orthanc", "storescp")
# (reference, associations or None for any, minimum grid/reference ratio of instances/s)
GOALS = [("orthanc", 4, 1.5), ("orthanc", 1, 1.0), ("storescp", None, 0.7)]


@dataclass
class RunResult:
    target: str
    corpus: str
    associations: int
    repetition: int
    instances: int
    bytes: int
    seconds: float
    load_1m: float
    other_grid_services: int  # services of other grids (test sessions) running when the run started
    cpu_machine_pct: float
    peak_rss: dict[str, int]
    cpu_seconds: dict[str, float]
    stored: int | None
    index_lag_s: float | None
    location_lag_s: float | None
    failures: list[str] = field(default_factory=list)
    note: str = ""
    replication_lag_s: float | None = None
    jit_seconds: dict[str, float] = field(default_factory=dict)  # of cpu_seconds: the JVMs' JIT compilers

    @property
    def ok(self) -> bool:
        return not self.failures and self.stored == self.instances

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "instances_per_s": round(self.instances_per_s, 1)}


def run_once(
    session: Session,
    target: Target,
    corpus: Corpus,
    associations: int,
    repetition: int,
    limit: int | None = None,
    around_send: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> RunResult:
    """One measured send of ``corpus`` (fresh UIDs) to ``target``; ``around_send`` wraps the sending only."""
    run = corpus.materialize(associations, limit)
    try:
        session.settle()
        target.before_run()
        load, others = os.getloadavg()[0], other_grid_services(str(BENCH_ROOT))
        with Sampler(target.groups) as sampler:
            with around_send():
                sent = send(run.parts, target.ae_title, target.port, session.log_dir)
            sampler.sent()
            check = target.after_run(run, sent)
        usage = sampler.usage
        return RunResult(
            target.key, corpus.spec.name, associations, repetition, run.count, run.total_bytes, sent.seconds,
            round(load, 2), others, usage.cpu_machine_pct, usage.peak_rss,
            {k: round(v, 2) for k, v in usage.cpu_seconds.items()}, check.stored, _rounded(check.index_lag_s),
            _rounded(check.location_lag_s), sent.failures, check.note, _rounded(check.replication_lag_s),
            {k: round(v, 2) for k, v in usage.jit_seconds.items()},
        )
    finally:
        run.remove()


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def warm_up(session: Session, target: Target) -> None:
    """A few unmeasured instances: connections, imports and caches of a (re)started target get ready."""
    target.activate()
    result = run_once(session, target, session.corpora[0], 1, 0, limit=session.options.warmup)
    if not result.ok:
        raise RuntimeError(f"warm-up of {target.label} failed: {result.failures or result.note or result.stored}")


# JVM warm-up (warm_jvms): batches of Options.jvm_warmup small instances, at the most associations measured,
# until the JIT compilers take less than JIT_SETTLED of the JVMs' CPU in a batch (or MAX batches).
JVM_WARMUP_MAX_BATCHES = 5
JIT_SETTLED = 0.10


def warm_jvms(session: Session) -> list[dict[str, Any]]:
    """Load each grid target until its Kafka and Cassandra JVMs have JIT-compiled their hot paths.

    A JVM that has just started spends most of its first few thousand requests compiling them (measured
    here: Cassandra's C2 compiler took 7-12 ms per small instance in the first 500 after a restart,
    0.2-0.8 ms a few thousand later), and would bill that to whichever rows run first. A grid runs for
    months, so it is measured warm; what compilation is left shows in the JIT table. Each reference
    target is sent one batch of the same size, so every target's first measured run follows the same
    load. Returns one entry per batch, for the report.
    """
    batch = session.options.jvm_warmup
    if not batch:
        return []
    associations = max(session.options.associations)
    corpus = session.corpora[0]
    done = []
    for target in session.targets:
        target.activate()
        for number in range(1, JVM_WARMUP_MAX_BATCHES + 1):
            result = run_once(session, target, corpus, associations, 0, limit=batch)
            if not result.ok:
                raise RuntimeError(f"JVM warm-up of {target.label} failed: {result.failures or result.note}")
            jvm_cpu = sum(result.cpu_seconds.get(g, 0.0) for g in result.jit_seconds)
            jit = sum(result.jit_seconds.values())
            share = jit / jvm_cpu if jvm_cpu else 0.0
            done.append({"target": target.key, "batch": number, "instances": result.instances,
                         "instances_per_s": round(result.instances_per_s, 1),
                         "jit_ms_per_instance": round(1000 * jit / result.instances, 2),
                         "jit_share": round(share, 3)})
            if not result.jit_seconds or share < JIT_SETTLED:
                break
    return done


def measure(session: Session) -> list[RunResult]:
    options = session.options
    targets = session.targets
    total = options.repetitions * len(targets) * len(session.corpora) * len(options.associations)
    runs = []
    with tqdm(total=total, desc="ingest runs", unit="run") as bar:
        for repetition in range(1, options.repetitions + 1):
            shift = (repetition - 1) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                warm_up(session, target)
                for corpus in session.corpora:
                    for associations in options.associations:
                        bar.set_postfix_str(f"{target.key} {corpus.spec.name} x{associations}")
                        runs.append(run_once(session, target, corpus, associations, repetition))
                        bar.update()
    return runs


@dataclass
class Row:
    """The medians of one (corpus, associations, target) over its repetitions."""

    corpus: str
    associations: int
    target: str
    label: str
    primary: str
    instances: int
    megabytes: float
    runs: int
    ok: bool
    instances_per_s: float
    spread_pct: float  # (max - min) / median of instances/s
    mb_per_s: float
    cpu_machine_pct: float
    load_1m: float
    peak_rss_mib: dict[str, float]  # max over repetitions, by process group
    cpu_ms_per_instance: dict[str, float]
    index_lag_s: float | None
    location_lag_s: float | None
    replication_lag_s: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)  # instances/s over each reference's
    jit_ms_per_instance: dict[str, float] = field(default_factory=dict)  # of cpu_ms_per_instance (JVMs)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _row(target: Target, mine: list[RunResult]) -> Row:
    first = mine[0]
    rates = [r.instances_per_s for r in mine]
    lags = [r.index_lag_s for r in mine if r.index_lag_s is not None]
    locations = [r.location_lag_s for r in mine if r.location_lag_s is not None]
    replications = [r.replication_lag_s for r in mine if r.replication_lag_s is not None]
    groups = sorted({g for r in mine for g in r.peak_rss})
    return Row(
        corpus=first.corpus,
        associations=first.associations,
        target=target.key,
        label=target.label,
        primary=target.primary,
        instances=first.instances,
        megabytes=round(first.bytes / MB, 1),
        runs=len(mine),
        ok=all(r.ok for r in mine),
        instances_per_s=round(_median(rates), 1),
        spread_pct=round(100 * (max(rates) - min(rates)) / _median(rates), 1),
        mb_per_s=round(_median([r.bytes / MB / r.seconds for r in mine]), 1),
        cpu_machine_pct=round(_median([r.cpu_machine_pct for r in mine]), 1),
        load_1m=round(_median([r.load_1m for r in mine]), 2),
        peak_rss_mib={g: round(max(r.peak_rss.get(g, 0) for r in mine) / 2**20, 1) for g in groups},
        cpu_ms_per_instance={
            g: round(_median([1000 * r.cpu_seconds.get(g, 0.0) / r.instances for r in mine]), 2) for g in groups
        },
        index_lag_s=round(_median(lags), 3) if lags else None,
        location_lag_s=round(_median(locations), 3) if locations else None,
        replication_lag_s=round(_median(replications), 3) if replications else None,
        jit_ms_per_instance={
            g: round(_median([1000 * r.jit_seconds.get(g, 0.0) / r.instances for r in mine]), 2)
            for g in sorted({g for r in mine for g in r.jit_seconds})
        },
    )


def summarize(session: Session, runs: list[RunResult]) -> list[Row]:
    """One row per (corpus, associations, target), with its ratios to the reference targets."""
    rows = []
    for corpus in session.corpora:
        for associations in session.options.associations:
            group: dict[str, Row] = {}
            for target in session.targets:
                mine = [r for r in runs
                        if (r.target, r.corpus, r.associations) == (target.key, corpus.spec.name, associations)]
                if mine:
                    group[target.key] = _row(target, mine)
            for row in group.values():
                for ref in REFERENCES:
                    if ref in group and row.target != ref and group[ref].instances_per_s:
                        row.ratios[ref] = round(row.instances_per_s / group[ref].instances_per_s, 2)
            rows.extend(group.values())
    return rows


def goals(rows: list[Row]) -> list[dict[str, Any]]:
    """Every goal for every grid configuration and corpus: the measured ratio and whether it is met."""
    out = []
    for row in rows:
        if not row.target.startswith("grid"):
            continue
        for ref, associations, minimum in GOALS:
            if associations is not None and row.associations != associations:
                continue
            measured = row.ratios.get(ref)
            out.append({
                "goal": f"{row.label} >= {minimum}x {ref} ({row.associations} assoc., {row.corpus})",
                "target": row.target, "corpus": row.corpus, "associations": row.associations,
                "reference": ref, "minimum": minimum, "measured": measured,
                "met": measured is not None and measured >= minimum,
            })
    return out


def _render(session: Session, rows: list[Row], goal_rows: list[dict[str, Any]],
            warm_up_batches: list[dict[str, Any]]) -> str:
    corpora = ", ".join(
        f"**{c.spec.name}**: {c.spec.count} CT images {c.spec.rows}x{c.spec.columns} 16-bit "
        f"(~{c.total_bytes / c.spec.count / 1e3:.0f} KB each) in {c.spec.studies} "
        + ("study" if c.spec.studies == 1 else "studies")
        for c in session.corpora
    )
    main = report.table(
        ["corpus", "assoc.", "target", "inst/s", "spread", "MB/s", "machine CPU", "peak RSS (MiB)",
         "index lag (s)", "replication lag (s)", "vs Orthanc", "vs storescp"],
        [[r.corpus, r.associations, r.label + ("" if r.ok else " (INCOMPLETE)"), f"{r.instances_per_s:.0f}",
          f"{r.spread_pct:.0f}%", f"{r.mb_per_s:.1f}", f"{r.cpu_machine_pct:.0f}%",
          f"{r.peak_rss_mib.get(r.primary, 0):.0f}", report.number(r.index_lag_s, 2),
          report.number(r.replication_lag_s, 2),
          report.ratio(r.ratios.get("orthanc")), report.ratio(r.ratios.get("storescp"))] for r in rows],
    )
    grid_rows = [r for r in rows if r.target.startswith("grid")]
    groups = [g for g in ("receivers", "processors", "replicator", "http", "kafka", "cassandra-dc1", "cassandra-dc2")
              if any(g in r.peak_rss_mib for r in grid_rows)]
    pipeline = report.table(
        ["corpus", "assoc.", "grid", *[f"{g} RSS MiB / CPU ms per inst." for g in groups]],
        [[r.corpus, r.associations, r.label,
          *[f"{r.peak_rss_mib.get(g, 0):.0f} / {r.cpu_ms_per_instance.get(g, 0):.2f}" for g in groups]]
         for r in grid_rows],
    )
    jvm_groups = [g for g in groups if any(g in r.jit_ms_per_instance for r in grid_rows)]
    jit = report.table(
        ["corpus", "assoc.", "grid", *[f"{g} JIT ms per inst." for g in jvm_groups]],
        [[r.corpus, r.associations, r.label, *[report.number(r.jit_ms_per_instance.get(g), 2) for g in jvm_groups]]
         for r in grid_rows],
    ) if jvm_groups else ""
    grid_batches = [b for b in warm_up_batches if b["target"].startswith("grid")]
    warmed = (
        f"Before the measured runs, each grid was sent batches of {grid_batches[0]['instances']} small instances "
        f"until its JVMs' JIT compilers took under {JIT_SETTLED:.0%} of their CPU (each reference: one batch); "
        "JIT ms per instance by batch: "
        + "; ".join(f"{t}: " + ", ".join(f"{b['jit_ms_per_instance']:.2f}" for b in grid_batches if b["target"] == t)
                    for t in dict.fromkeys(b["target"] for b in grid_batches))
        + ".\n"
    ) if grid_batches else ""
    others = report.table(
        ["corpus", "assoc.", "target", "CPU ms per instance (target processes)"],
        [[r.corpus, r.associations, r.label, f"{r.cpu_ms_per_instance.get(r.primary, 0):.2f}"]
         for r in rows if not r.target.startswith("grid")],
    )
    goal_table = report.table(
        ["goal", "measured", "met"],
        [[g["goal"], report.ratio(g["measured"]), "yes" if g["met"] else "**no**"] for g in goal_rows],
    )
    return (
        f"Corpora: {corpora}. Every run sends the corpus with fresh UIDs. "
        f"{session.options.repetitions} repetition(s), medians; *spread* is (max - min) / median of inst/s.\n\n"
        f"{main}\n"
        "*machine CPU*: both cores together over the sending window (100% = both busy; storescu included). "
        "*peak RSS*: the target's own processes (grid: sum of its receiver processes). *index lag*: from the "
        "last C-STORE response until the last instance of every association is in the indexer's `instances` "
        "table (what C-FIND and QIDO-RS read). The receiver makes no Cassandra round trip; the indexer writes "
        "`instance_locations` with the rest of the index (`location_lag_s` in the JSON). *replication lag*: "
        "two-site grid (as `make run` starts it), from the last C-STORE response at A until B holds a verified "
        "copy of every instance (the `WRITETIME` of the last verified `replicas` row at B, read once B has "
        "announced every copy in `dicom.replica.stored`); that row's CPU counts until they are all seen, B's replication "
        "worker and A's payload endpoint (http) included.\n\n"
        f"### Goals\n\n{goal_table}\n"
        "### Grid pipeline: peak RSS and CPU per instance by process group\n\n"
        "CPU time counts from the first C-STORE until the run's last instance is indexed. The Cassandra "
        "nodes and Kafka are shared with any other grid running on the machine.\n\n"
        f"{pipeline}\n"
        + (f"Of the JVMs' CPU above, what their JIT compilers took (HotSpot's C1/C2 threads):\n\n{jit}\n"
           if jit else "")
        + f"{warmed}\n"
        f"### Reference targets: CPU per instance\n\n{others}\n"
        "### Settings\n\n"
        f"- Client: DCMTK `storescu {' '.join(STORESCU_OPTIONS)} -aet STORESCU -aec <AE> 127.0.0.1 <port> FILES...`, "
        "`TCP_NODELAY=1`, one process per association, the corpus split into contiguous parts.\n"
        f"- storescp: `{session.target('storescp').describe()['argv']}`; no fsync, no index.\n"
        f"- Orthanc: SQLite index, file storage, `SyncStorageArea: true` (fsync), `MaximumPduLength: {MAX_PDU}`, "
        "Debian's DICOMweb plugin loaded (for the WADO-RS rows), `TCP_NODELAY=1`.\n"
        "- dicomgrid: one site; before each C-STORE response: blob atomic rename + fsync (and a directory fsync "
        "where the filesystem needs one: not on ext4 or XFS), "
        "Kafka `acks=all` (idempotent producer); no Cassandra round trip on the receive path; the faust indexer "
        "numbers versions and writes the index (LOCAL_QUORUM, RF 1). Max PDU 256 KiB.\n"
    )


class IngestScenario:
    key = "ingest"
    title = "Ingest (C-STORE), everything durable"

    def run(self, session: Session) -> Section:
        warm_up_batches = warm_jvms(session)
        runs = measure(session)
        rows = summarize(session, runs)
        goal_rows = goals(rows)
        # The replication sections stream into site A at these rates.
        session.shared["ingest_rows"] = [asdict(r) for r in rows]
        data = {
            "targets": {t.key: {"label": t.label, **t.describe()} for t in session.targets},
            "corpora": [{**asdict(c.spec), "bytes": c.total_bytes} for c in session.corpora],
            "rows": [asdict(r) for r in rows],
            "goals": goal_rows,
            "jvm_warm_up": warm_up_batches,
            "runs": [r.as_dict() for r in runs],
        }
        return Section(self.key, self.title, True, _render(session, rows, goal_rows, warm_up_batches), data)
