"""Payload replication lag: how long after its C-STORE at site A site B holds a verified copy.

The two-site grid (:data:`bench.grid.TWO_SITES`: A on Cassandra dc1, B on dc2, one keyspace replicated to
both, each site replicating to the other, every service of both sites running, replication workers
included) receives small CT instances at A under three loads:

* **one at a time** over one association: each instance is stored, watched until every probe has
  answered yes, then the next follows after a short pause. The idle grid's latency.
* **a stream at the ingest rate**, over 1 and over 4 associations: the ingest section's own load, DCMTK
  storescu sending as fast as site A answers (its log gives every response's time). On one association
  the ingest rate is the rate of back-to-back C-STOREs by definition, and at 4 the grid's CPU sets it, so
  a paced client would add nothing but its own overhead. The ingest section's rate for the same number
  of associations (:mod:`bench.history`) is shown beside the rate A reached here, where the other
  site's services and replication share the machine.

**When B holds a verified copy** is read from B's ``replicas`` ledger: the moment B's row with
``verified_at`` was written (``WRITETIME(verified_at)``, microseconds, the same machine clock as the
harness's). The replication worker writes that row last, after the copy's SHA-256 matched, the copy was
fsynced and renamed into place, and its ``dicom.replica.stored`` event was acknowledged; it is what
Storage Commitment and ``dicomgrid replication status`` read to call an instance safe. Reading it once
after a load costs the grid nothing while it is measured, unlike polling it per instance. The
``dicom.replica.stored`` events (their Kafka timestamps) are a secondary row: they come a Kafka
acknowledgement earlier. So are the metadata rows of the one-at-a-time load, polled: B's C-FIND finds
the instance (the index in B's datacenter) and, for a sample, A's own C-FIND (the indexer alone).
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from typing import Any

from dicomgrid import schemas

from bench import report
from bench.availability import IndexAtSite, Ledger, ReplicaAtSite, SentInstance, watch
from bench.dimse_clients import StoreClient
from bench.events import Tap
from bench.grid import TWO_SITES, BenchGrid
from bench.history import Rate, full_runs, ingest_rates
from bench.paths import RESULTS
from bench.sampler import Sampler
from bench.sections import Section
from bench.session import Session
from bench.stats import summary
from bench.storescu import OPTIONS as STORESCU_OPTIONS
from bench.storescu import send

WARMUP = 3  # instances stored and watched first, not measured
READY_TIMEOUT_S = 30.0  # a probe that never answers yes this long after a warm-up store is not available
LAG_TIMEOUT_S = 30.0  # a measured instance not available this long after its store counts as missing
STREAM_ASSOCIATIONS = (1, 4)
GOAL_P99_S = 2.0
GOAL_PROBE = "replica-B"
LEDGER_ROW = "`replicas` row with `verified_at` at site B"
EVENT_ROW = "`dicom.replica.stored` for site B (Kafka timestamp)"


def _wall(monotonic: float) -> float:
    """A ``time.monotonic()`` moment of the past as ``time.time()``."""
    return time.time() - (time.monotonic() - monotonic)


def answer_times(part_sizes: list[int], responses: list[list[float]]) -> list[float]:
    """The C-STORE response time of every instance of a run, in corpus order.

    A run's parts are contiguous slices of its corpus, one per association, and storescu answers its
    files in order, so response ``i`` of association ``k`` is instance ``sum(part_sizes[:k]) + i``.
    """
    if [len(r) for r in responses] != part_sizes:
        raise ValueError(f"{[len(r) for r in responses]} responses for parts of {part_sizes} instances")
    return [at for times in responses for at in times]


def _copies_of(tap: Tap, site: str, uids: set[str]) -> dict[str, tuple[str, float]]:
    """SOP Instance UID -> (digest, Kafka timestamp) of the copies ``site`` announced, among ``uids``."""
    out = {}
    for seen in tap.seen:
        event = seen.event
        if event.get("replica", {}).get("site") == site and event.get("sop_instance_uid") in uids:
            out.setdefault(event["sop_instance_uid"], (event["replica"]["sha256"], seen.appended_at))
    return out


def _ledger_times(ledger: Ledger, digests: list[str], timeout_s: float = 10.0) -> dict[str, float]:
    """Write times of the verified rows of ``digests``; a row follows its event by a moment, so wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        written = ledger.verified_written_many(digests)
        if len(written) == len(digests) or time.monotonic() > deadline:
            return written
        time.sleep(0.2)


def replica_lags(answered_at: dict[str, float], copies: dict[str, tuple[str, float]],
                 written: dict[str, float], parts: int = 5) -> dict[str, Any]:
    """Lags (ms) of every instance from its C-STORE response: of B's ledger row and of B's event.

    ``by_part_p50_ms``: the median ledger lag of each of ``parts`` consecutive slices of the load, in
    the order A answered: rising from slice to slice, replication falls behind while A ingests.
    """
    ledger, events, timed = [], [], []
    for uid, at in answered_at.items():
        if uid in copies:
            digest, appended = copies[uid]
            events.append(1000 * (appended - at))
            if digest in written:
                ledger.append(1000 * (written[digest] - at))
                timed.append((at, ledger[-1]))
    timed.sort()
    bounds = [round(k * len(timed) / parts) for k in range(parts + 1)]
    by_part = [summary([lag for _, lag in timed[bounds[k]:bounds[k + 1]]], 1)["p50"] for k in range(parts)]
    return {"ledger_ms": summary(ledger, 1), "event_ms": summary(events, 1),
            "missing": len(answered_at) - len(ledger), "by_part_p50_ms": by_part,
            "ledger_samples_ms": [round(v, 1) for v in ledger]}


def _one_at_a_time(session: Session, grid: BenchGrid, stack: ExitStack) -> dict[str, Any]:
    site_a, site_b = TWO_SITES.sites
    options = session.options
    corpus = session.corpus(options.lag_corpus)
    run = corpus.materialize(1)
    stack.callback(run.remove)
    tap = Tap(grid.config(), schemas.TOPIC_REPLICA_STORED)
    stack.callback(tap.close)
    sender = stack.enter_context(StoreClient("127.0.0.1", grid.ports[site_a.name].dicom, site_a.ae_title))
    reference = IndexAtSite(grid, site_a)
    reference.sampled = True  # asked on the sample only, so most rounds ask site B alone (finer lags)
    index_b, replica_b = IndexAtSite(grid, site_b), ReplicaAtSite(grid, site_b)
    at_b = [index_b, replica_b]
    for probe in (reference, *at_b):
        stack.callback(probe.close)
    items = [(corpus.key(run.token, i), path) for i, path in enumerate(run.parts[0])]

    # Warm-up: connections, prepared statements, consumer groups that may still be joining.
    for key, path in items[:WARMUP]:
        item = SentInstance(key, path, sender.store(path))
        seen = watch([reference, *at_b], item, READY_TIMEOUT_S)
        missing = [k for k, lag in seen.lags_s.items() if lag is None]
        if missing:
            raise RuntimeError(f"no answer within {READY_TIMEOUT_S:.0f} s of a warm-up C-STORE from: {missing}")

    polled: dict[str, list[float]] = {p.key: [] for p in (reference, *at_b)}
    missing = dict.fromkeys(polled, 0)
    answered_at: dict[str, float] = {}
    round_s, store_ms = [], []
    measured = items[WARMUP:]
    started, load = time.monotonic(), os.getloadavg()[0]
    with Sampler(grid.processes) as sampler:
        for n, (key, path) in enumerate(measured):
            asked = [p for p in (reference, *at_b) if not p.sampled or n % options.lag_sample_every == 0]
            before = time.monotonic()
            item = SentInstance(key, path, sender.store(path))
            answered_at[key.sop_instance_uid] = _wall(item.stored_at)
            store_ms.append((item.stored_at - before) * 1000)
            seen = watch(asked, item, LAG_TIMEOUT_S)
            for probe_key, lag in seen.lags_s.items():
                if lag is None:
                    missing[probe_key] += 1
                else:
                    polled[probe_key].append(lag * 1000)
            round_s.append(seen.round_s)
            time.sleep(options.lag_gap_s)
        sampler.sent()
    seconds = time.monotonic() - started
    tap.until(lambda _: len(_copies_of(tap, site_b.name, set(answered_at))) >= len(answered_at), timeout=10)
    copies = _copies_of(tap, site_b.name, set(answered_at))
    written = _ledger_times(replica_b.ledger, [digest for digest, _ in copies.values()])
    lags = replica_lags(answered_at, copies, written)
    metadata = []
    for probe, path in ((reference, "metadata, same site (reference)"), (index_b, "metadata")):
        metadata.append({"key": probe.key, "title": probe.title, "path": path, "lag_ms": summary(polled[probe.key], 1),
                         "not_within_timeout": missing[probe.key]})
    return {
        "load": "one at a time", "associations": 1, "instances": len(measured), "warmup": WARMUP,
        "rate_achieved": round(len(measured) / seconds, 1),
        "gap_s": options.lag_gap_s, "sample_every": options.lag_sample_every, "timeout_s": LAG_TIMEOUT_S,
        "instance_bytes": round(sum(p.stat().st_size for _, p in items) / len(items)),
        "store_ms": summary(store_ms, 1), "round_ms": summary([1000 * r for r in round_s], 1),
        "ledger_polled_ms": summary(polled[replica_b.key], 1),
        "cpu_machine_pct": sampler.usage.cpu_machine_pct, "load_1m": round(load, 2),
        **lags, "metadata": metadata,
    }


def _stream(session: Session, grid: BenchGrid, reference: Rate, stack: ExitStack) -> dict[str, Any]:
    """Site A ingests a stream as fast as it answers, with the ingest section's client and association count."""
    site_a, site_b = TWO_SITES.sites
    corpus = session.corpus(session.options.stream_corpus)
    run = corpus.materialize(reference.associations)
    stack.callback(run.remove)
    keys = [corpus.key(run.token, i) for i in range(run.count)]
    tap = Tap(grid.config(), schemas.TOPIC_REPLICA_STORED)
    ledger = Ledger(grid, site_b)
    try:
        session.settle()
        load = os.getloadavg()[0]
        with Sampler(grid.processes) as sampler:
            sent = send(run.parts, site_a.ae_title, grid.ports[site_a.name].dicom, session.log_dir)
            sampler.sent()
            if sent.failures:
                raise RuntimeError(f"stream into site A failed: {sent.failures[0]}")
            times = answer_times([len(part) for part in run.parts], sent.responses)
            answered_at = {key.sop_instance_uid: at for key, at in zip(keys, times)}
            timeout = 60.0 + run.count / 20
            tap.until(lambda _: len(_copies_of(tap, site_b.name, set(answered_at))) >= run.count, timeout=timeout)
        copies = _copies_of(tap, site_b.name, set(answered_at))
        written = _ledger_times(ledger, [digest for digest, _ in copies.values()])
    finally:
        tap.close()
        ledger.close()
    lags = replica_lags(answered_at, copies, written)
    last_copy = max(written.values(), default=None)
    return {
        "load": f"storescu, {reference.associations} assoc.", "associations": reference.associations,
        "instances": run.count, "instance_bytes": round(run.total_bytes / run.count),
        "rate_achieved": round(run.count / sent.seconds, 1),
        "ingest_section_rate": round(reference.instances_per_s, 1), "ingest_section_source": reference.source,
        "seconds": round(sent.seconds, 2),
        # How long after A's last C-STORE response B had every copy: it grows with a longer stream only
        # if replication cannot keep A's pace.
        "caught_up_s": None if last_copy is None or lags["missing"] else
        round(last_copy - max(answered_at.values()), 2),
        "cpu_machine_pct": sampler.usage.cpu_machine_pct, "load_1m": round(load, 2),
        "cpu_ms_per_instance": {g: round(1000 * s / run.count, 2) for g, s in sampler.usage.cpu_seconds.items()},
        **lags,
    }


def _goal(loads: list[dict[str, Any]]) -> dict[str, Any]:
    worst = [r["ledger_ms"]["p99"] for r in loads]
    met = all(p is not None and p / 1000 < GOAL_P99_S for p in worst) and all(r["missing"] == 0 for r in loads)
    measured = None if any(p is None for p in worst) else max(worst) / 1000
    return {"goal": f"payload replication lag p99 < {GOAL_P99_S:.0f} s at every load", "measured_on": LEDGER_ROW,
            "measured_s": measured, "met": met}


def _render(loads: list[dict[str, Any]], goal: dict[str, Any]) -> str:
    single, streams = loads[0], loads[1:]

    def rate(r: dict[str, Any]) -> str:
        if "ingest_section_rate" not in r:
            return f"{r['rate_achieved']:.1f} (paced by the probes)"
        return f"{r['rate_achieved']:.0f} ({r['ingest_section_rate']:.0f})"

    main = report.table(
        ["load at site A", "instances", "C-STOREs/s at A (ingest section)", "p50 ms", "p99 ms", "max ms",
         "p50 ms by fifth of the load", "not replicated", "B complete after A's last response (s)",
         "machine CPU", "load"],
        [[r["load"], r["instances"], rate(r), report.number(r["ledger_ms"]["p50"]),
          report.number(r["ledger_ms"]["p99"]), report.number(r["ledger_ms"]["max"]),
          " / ".join(report.number(v, 0) for v in r["by_part_p50_ms"]), r["missing"],
          report.number(r.get("caught_up_s"), 2), f"{r['cpu_machine_pct']:.0f}%", f"{r['load_1m']:.2f}"]
         for r in loads])
    secondary_rows = [[r["load"], EVENT_ROW, "payload", r["event_ms"]["n"], report.number(r["event_ms"]["p50"]),
                       report.number(r["event_ms"]["p99"]), report.number(r["event_ms"]["max"])] for r in loads]
    secondary_rows += [[single["load"], m["title"], m["path"], m["lag_ms"]["n"], report.number(m["lag_ms"]["p50"]),
                        report.number(m["lag_ms"]["p99"]), report.number(m["lag_ms"]["max"])]
                       for m in single["metadata"]]
    secondary = report.table(["load at site A", "available at", "path", "instances", "p50 ms", "p99 ms", "max ms"],
                             secondary_rows)
    sources = "; ".join(sorted({r["ingest_section_source"] for r in streams}))
    groups = [g for g in ("receivers", "processors", "http", "replicator", "kafka", "cassandra-dc1", "cassandra-dc2")
              if any(g in r["cpu_ms_per_instance"] for r in streams)]
    cpu = report.table(["load at site A", *groups],
                       [[r["load"], *[f"{r['cpu_ms_per_instance'].get(g, 0):.2f}" for g in groups]]
                        for r in streams]) if streams else ""
    return (
        "Time from the C-STORE success response at site A until site B holds a **verified copy of the payload**: "
        f"the {LEDGER_ROW} (its `WRITETIME`, read after each load; the worker writes it after the SHA-256 "
        "matched, the copy was fsynced and renamed into place and its `dicom.replica.stored` was acknowledged).\n\n"
        f"Two-site grid: A (Cassandra dc1) and B (dc2), one replica of the keyspace in each; receiver, HTTP, "
        f"stream processors and replication worker of both sites running. Small CT instances "
        f"(~{single['instance_bytes'] / 1e3:.0f} KB). *One at a time*: {single['instances']} instances over one "
        f"pynetdicom association (after {single['warmup']} unmeasured), each watched until B's ledger row and "
        f"B's C-FIND answered, then a {1000 * single['gap_s']:.0f} ms pause. *storescu*: the ingest section's load, "
        f"`storescu {' '.join(STORESCU_OPTIONS)}` (`TCP_NODELAY=1`) sending a stream as fast as site A answers, "
        "over 1 and 4 associations; in brackets the grid's rate in the ingest section for as many associations "
        f"(one site, nothing replicating; {sources}).\n\n"
        + main
        + "\n*by fifth*: the median lag of each fifth of the instances in the order A answered them (rising: "
        "replication falls behind while A ingests). *not replicated*: no verified row within the timeout. "
        "*B complete*: B's last ledger row after A's last "
        "C-STORE response; it grows with the stream's length when replication does not keep A's pace. "
        "*machine CPU*: both cores over the sending window (100% = both busy); *load*: 1-minute load average "
        "when the load started (other engineers' tests share the machine and its Kafka and Cassandra).\n\n"
        "Secondary rows: B's `dicom.replica.stored` event (a Kafka acknowledgement before the ledger row), and, "
        "for the one-at-a-time load, the metadata path (polled; over-stated by at most one round of probes, "
        f"median round {report.number(single['round_ms']['p50'])} ms; site A's C-FIND for every "
        f"{single['sample_every']}th instance only):\n\n"
        + secondary
        + ("\nCPU ms per instance by process group (both sites' processes summed per group) during the storescu "
           "loads, from the first C-STORE until B had every copy:\n\n" + cpu if cpu else "")
        + "\n### Goal\n\n"
        + report.table(["goal", "measured on", "worst p99", "met"],
                       [[goal["goal"], goal["measured_on"],
                         "-" if goal["measured_s"] is None else f"{goal['measured_s']:.2f} s",
                         "yes" if goal["met"] else "**no**"]])
    )


class ReplicationScenario:
    key = "replication"
    title = "Payload replication lag A -> B (one at a time, and while A ingests at full rate)"

    def run(self, session: Session) -> Section:
        grid = session.sites_grid()
        rates = ingest_rates(STREAM_ASSOCIATIONS, session.shared.get("ingest_rows"), full_runs(RESULTS))
        with ExitStack() as stack:
            loads = [_one_at_a_time(session, grid, stack)]
        for rate in rates:
            with ExitStack() as stack:
                loads.append(_stream(session, grid, rate, stack))
        goal = _goal(loads)
        result = {
            "sites": {s.name: {"dc": s.dc, "ae_title": s.ae_title, "dicom_port": grid.ports[s.name].dicom,
                               "http_port": grid.ports[s.name].http} for s in TWO_SITES.sites},
            "keyspace": TWO_SITES.keyspace, "replication": TWO_SITES.replication, "loads": loads,
        }
        lines = [f"{r['load']}: p50 {report.number(r['ledger_ms']['p50'], 0)} ms, p99 "
                 f"{report.number(r['ledger_ms']['p99'], 0)} ms ({r['ledger_ms']['n']} instances"
                 + f", {r['rate_achieved']:.0f} C-STOREs/s at A)" for r in loads]
        lines.append(f"goal {goal['goal']}: "
                     + ("-" if goal["measured_s"] is None else f"{goal['measured_s']:.2f} s, ")
                     + ("met" if goal["met"] else "NOT met"))
        return Section(self.key, self.title, True, _render(loads, goal), {**result, "goal": goal}, summary=lines)
