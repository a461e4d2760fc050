"""Self-healing: rebuilding an emptied site from the other site's copies, and a scrub pass's rate.

**Setup** (the two-site grid of :mod:`bench.replication`, both replication workers running): every
repetition stores the healing corpora (the ingest section's ~40 KB and ~0.5 MB CT images, fresh UIDs) at
site A with storescu over 4 associations and waits until A has indexed every instance and B's ledger
lists a verified copy of each, so replication is over and B's worker is idle.

**Recover**: site B loses its disk. Its blob store directory is *moved aside* (retired, see
:mod:`bench.retired`) and an empty directory takes its place; B's services keep running. It is not
deleted: right after deleting many files this disk makes every file creation slow for minutes, which
would be measured instead of the recovery. Then :class:`~dicomgrid.processors.recovery.Recovery`
rebuilds it exactly as ``dicomgrid recover --site B`` builds it (``open_site(config, "B", "recovery")``,
``site_transfer`` with no bandwidth cap, ``concurrency = replication.concurrency`` as shipped), run in the
bench process, its plan (computed before the clock starts, as the CLI does before its progress bar)
restricted to one corpus's instances: first the small corpus, then the large one. Timed by the
recovery itself (``RecoveryReport.seconds``); CPU (user + system) sampled per process while it runs:
the bench process (the recovery; it also runs the sampler), A's HTTP service (serving the payloads),
Kafka and both Cassandra nodes.

**Scrub**: :class:`~dicomgrid.processors.scrub.Scrubber` as ``dicomgrid scrub --site A`` builds it, with
no rate cap, over everything A's store holds (every repetition's corpora, and earlier sections'
instances in a full run). Measured twice: *cold*, after ``sync`` and ``posix_fadvise(DONTNEED)`` on every
blob (A's blobs were written seconds before and would otherwise be hashed from the page cache), then
*warm*, right after. Timed (and CPU counted) from the start of the pass until the last local copy is
re-hashed and its ledger ``verified_at`` moved; the pass is stopped there, before its look for missing
copies: the bench keyspace outlives every session's blob stores, so the policy still lists the payloads
of earlier sessions, and trying to repair those would be measured instead. CPU per GB re-hashed.

Moved-aside stores are deleted when the session ends, with everything else retired.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from dicomgrid.core.site import SiteContext, open_site
from dicomgrid.processors.recovery import Recovery
from dicomgrid.processors.replicator import site_transfer
from dicomgrid.processors.scrub import Scrubber

from bench import report
from bench.availability import Ledger
from bench.corpus import Corpus, CorpusSpec, RunCorpus
from bench.grid import TWO_SITES, BenchGrid
from bench.retired import retire
from bench.sampler import Sampler
from bench.sections import Section
from bench.session import Session
from bench.storescu import send

MB, GB = 1e6, 1e9
ASSOCIATIONS = 4
SOURCE_HTTP = "A/http"
RECOVERY, SCRUB = "recovery (bench process)", "scrub (bench process)"
REPLICATED_TIMEOUT_S = 300.0
HEALING_SMALL, HEALING_LARGE = 1000, 100  # the default sizes (``--quick``: 100 and 20)


def healing_corpora(small: int, large: int) -> list[CorpusSpec]:
    """The ingest section's corpora (same seeds, so their cached templates are reused) at healing sizes."""
    return [CorpusSpec("small", small, 140, 140, studies=5, seed=1),
            CorpusSpec("large", large, 512, 512, studies=1, seed=2)]


@dataclass
class RecoverRun:
    corpus: str
    repetition: int
    instances: int  # planned for this corpus
    copied: int
    held: int  # found already held (should be 0: the store was empty)
    failed: dict[str, int]
    bytes: int
    seconds: float
    load_1m: float
    cpu_machine_pct: float
    cpu_seconds: dict[str, float]
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed and self.copied == self.instances


@dataclass
class ScrubRun:
    cache: str  # "cold" or "warm"
    repetition: int
    copies: int
    bytes: int
    seconds: float
    corrupt: int
    missing: int
    complete: bool
    load_1m: float
    cpu_machine_pct: float
    cpu_seconds: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.complete and not self.corrupt and not self.missing


def _own_process() -> psutil.Process:
    return psutil.Process(os.getpid())


def drop_cached(root: Path) -> int:
    """Ask the kernel to drop the (clean, after sync) cached pages of every file under ``root``; how many."""
    os.sync()
    count = 0
    for path in root.rglob("*"):
        if path.is_file():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


class Healing:
    """One two-site grid's healing measurements: store and replicate, empty B and recover, scrub A."""

    def __init__(self, session: Session, grid: BenchGrid) -> None:
        self.session = session
        self.grid = grid
        self.config = grid.config()
        self.ledger_b = Ledger(grid, TWO_SITES.sites[1])

    def close(self) -> None:
        self.ledger_b.close()

    def groups(self, role: str, *, source: bool) -> dict[str, list[psutil.Process]]:
        out = {role: [_own_process()]}
        if source:
            out["http (A)"] = [self.grid.process(SOURCE_HTTP)]
        return {**out, **self.grid.jvms()}

    # -- setup ------------------------------------------------------------------------------------

    def store_replicated(self, corpus: Corpus) -> tuple[RunCorpus, set[str]]:
        """Store the corpus at A; wait until A indexed it and B verified a copy of every instance."""
        site_a = TWO_SITES.sites[0]
        run = corpus.materialize(ASSOCIATIONS)
        sent = send(run.parts, site_a.ae_title, self.grid.ports[site_a.name].dicom, self.session.log_dir)
        if sent.failures:
            raise RuntimeError(f"healing corpus not stored at site A: {sent.failures[0]}")
        indexed = self.grid.wait_indexed(run, sent)
        if indexed.stored != run.count:
            raise RuntimeError(f"healing corpus not indexed at site A: {indexed}")
        uids = {corpus.key(run.token, i).sop_instance_uid for i in range(run.count)}
        digests: dict[str, str] = {}
        deadline = time.monotonic() + REPLICATED_TIMEOUT_S
        while True:
            for uid in uids - digests.keys():
                digest = self.ledger_b.digest_of(uid)
                if digest is not None:
                    digests[uid] = digest
            verified = self.ledger_b.verified_written_many(list(digests.values())) if digests else {}
            if len(digests) == len(uids) and len(verified) == len(set(digests.values())):
                return run, uids
            if time.monotonic() > deadline:
                raise RuntimeError(f"B verified {len(verified)}/{len(uids)} copies within {REPLICATED_TIMEOUT_S:.0f} s")
            time.sleep(0.5)

    def empty_site_b(self) -> None:
        """B loses its disk: its store is retired (moved aside, deleted when the session ends, see
        :mod:`bench.retired`) and an empty directory replaces it."""
        store = self.grid.storage_of("B")
        retire(store)
        store.mkdir()

    # -- measurements -----------------------------------------------------------------------------

    def recover(self, context: SiteContext, corpus: str, uids: set[str], repetition: int) -> RecoverRun:
        checkpoint = self.grid.dir / f"recover-B-{corpus}.done"
        checkpoint.unlink(missing_ok=True)
        recovery = Recovery(context, site_transfer(context), checkpoint,
                            concurrency=self.config.replication.concurrency)
        plan, already = recovery.plan()
        plan = [h for h in plan if h.instance.sop_instance_uid in uids]
        if len(plan) != len(uids):
            raise RuntimeError(f"recovery plan holds {len(plan)}/{len(uids)} of the {corpus} corpus's instances")
        self.session.settle()
        jvms = self.grid.refresh_jvms()
        load = os.getloadavg()[0]
        with Sampler(lambda: self.groups(RECOVERY, source=True)) as sampler:
            result = recovery.run(plan)
            sampler.sent()
        note = "a cluster node restarted during the run: its CPU is not fully counted" \
            if self.grid.refresh_jvms() != jvms else ""
        return RecoverRun(corpus, repetition, len(plan), result.copied, result.held, dict(result.failed),
                          result.bytes_copied, result.seconds, round(load, 2), sampler.usage.cpu_machine_pct,
                          {k: round(v, 3) for k, v in sampler.usage.cpu_seconds.items()}, note)

    def scrub(self, context: SiteContext, cache: str, repetition: int) -> ScrubRun:
        """One scrub pass over A's local copies, timed until the last copy is re-hashed.

        The pass is stopped there, before its second part (copies the policy lists but the store lacks):
        the bench keyspace outlives every session's blob stores, so the policy lists many payloads that
        earlier sessions' stores held, and repairing those (none can be) would be measured instead.
        """
        checkpoint = self.grid.dir / "scrub-A.json"
        checkpoint.unlink(missing_ok=True)
        if cache == "cold":
            drop_cached(context.blobs.root / "sha256")
        total = sum(1 for _ in context.blobs.digests())
        self.session.settle()
        load = os.getloadavg()[0]
        scrubber = Scrubber(context, site_transfer(context), checkpoint, rate_bytes_s=None)
        done: dict[str, Any] = {"copies": 0, "bytes": 0}
        with Sampler(lambda: self.groups(SCRUB, source=False)) as sampler:

            def progress(size: int) -> None:
                done["copies"] += 1
                done["bytes"] += size
                if done["copies"] == total:
                    done["at"] = time.monotonic()
                    done["cpu"] = sampler.cpu_so_far()
                    sampler.sent()

            started = time.monotonic()
            result = scrubber.run(should_stop=lambda: done["copies"] >= total, on_progress=progress)
        checkpoint.unlink(missing_ok=True)
        if "at" not in done:
            raise RuntimeError(f"scrub re-hashed {done['copies']}/{total} of A's copies")
        return ScrubRun(cache, repetition, result.checked, result.bytes_checked, done["at"] - started,
                        result.corrupt, result.missing, result.checked == total, round(load, 2),
                        sampler.usage.cpu_machine_pct, {k: round(v, 3) for k, v in done["cpu"].items()})


# -- results --------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def recover_row(runs: list[RecoverRun]) -> dict[str, Any]:
    rates = [r.copied / r.seconds for r in runs]
    groups = sorted({g for r in runs for g in r.cpu_seconds})
    return {
        "corpus": runs[0].corpus, "runs": len(runs), "ok": all(r.ok for r in runs), "instances": runs[0].instances,
        "mb": round(runs[0].bytes / MB, 1), "seconds": round(_median([r.seconds for r in runs]), 2),
        "instances_per_s": round(_median(rates), 1),
        "spread_pct": round(100 * (max(rates) - min(rates)) / _median(rates), 1),
        "mb_per_s": round(_median([r.bytes / MB / r.seconds for r in runs]), 1),
        "cpu_machine_pct": round(_median([r.cpu_machine_pct for r in runs]), 1),
        "load_1m": round(_median([r.load_1m for r in runs]), 2),
        "cpu_s": {g: round(_median([r.cpu_seconds.get(g, 0.0) for r in runs]), 2) for g in groups},
        "cpu_ms_per_instance": {g: round(_median([1000 * r.cpu_seconds.get(g, 0.0) / r.instances for r in runs]), 2)
                                for g in groups},
    }


def scrub_row(runs: list[ScrubRun]) -> dict[str, Any]:
    rates = [r.bytes / MB / r.seconds for r in runs]
    groups = sorted({g for r in runs for g in r.cpu_seconds})
    return {
        "cache": runs[0].cache, "runs": len(runs), "ok": all(r.ok for r in runs),
        "copies": round(_median([r.copies for r in runs])), "mb": round(_median([r.bytes / MB for r in runs]), 1),
        "seconds": round(_median([r.seconds for r in runs]), 2), "mb_per_s": round(_median(rates), 1),
        "spread_pct": round(100 * (max(rates) - min(rates)) / _median(rates), 1),
        "cpu_machine_pct": round(_median([r.cpu_machine_pct for r in runs]), 1),
        "load_1m": round(_median([r.load_1m for r in runs]), 2),
        "cpu_s_per_gb": {g: round(_median([r.cpu_seconds.get(g, 0.0) / (r.bytes / GB) for r in runs]), 1)
                         for g in groups},
    }


GROUP_ORDER = (RECOVERY, SCRUB, "http (A)", "kafka", "cassandra-dc1", "cassandra-dc2")


def _groups(rows: list[dict[str, Any]], key: str) -> list[str]:
    present = {g for r in rows for g in r[key]}
    return [g for g in GROUP_ORDER if g in present] + sorted(present - set(GROUP_ORDER))


def render(session: Session, recover_rows: list[dict[str, Any]], scrub_rows: list[dict[str, Any]],
           uptime: str, quick: bool) -> str:
    specs = healing_corpora(session.options.healing_small, session.options.healing_large)
    corpora = ", ".join(f"**{s.name}**: {s.count} CT images {s.rows}x{s.columns} 16-bit" for s in specs)
    rec_groups = _groups(recover_rows, "cpu_s")
    recover = report.table(
        ["corpus", "instances", "MB", "s", "inst/s", "spread", "MB/s", "machine CPU", "load",
         *[f"CPU s: {g}" for g in rec_groups], *[f"CPU ms/inst: {g}" for g in rec_groups]],
        [[r["corpus"] + ("" if r["ok"] else " (INCOMPLETE)"), r["instances"], f"{r['mb']:.0f}", f"{r['seconds']:.2f}",
          f"{r['instances_per_s']:.0f}", f"{r['spread_pct']:.0f}%", f"{r['mb_per_s']:.1f}",
          f"{r['cpu_machine_pct']:.0f}%", f"{r['load_1m']:.2f}",
          *[f"{r['cpu_s'].get(g, 0):.2f}" for g in rec_groups],
          *[f"{r['cpu_ms_per_instance'].get(g, 0):.2f}" for g in rec_groups]] for r in recover_rows])
    scr_groups = _groups(scrub_rows, "cpu_s_per_gb")
    scrub = report.table(
        ["page cache", "copies", "MB", "s", "MB/s", "spread", "machine CPU", "load",
         *[f"CPU s/GB: {g}" for g in scr_groups]],
        [[r["cache"] + ("" if r["ok"] else " (FINDINGS OR INCOMPLETE)"), r["copies"], f"{r['mb']:.0f}",
          f"{r['seconds']:.2f}", f"{r['mb_per_s']:.1f}", f"{r['spread_pct']:.0f}%", f"{r['cpu_machine_pct']:.0f}%",
          f"{r['load_1m']:.2f}", *[f"{r['cpu_s_per_gb'].get(g, 0):.1f}" for g in scr_groups]] for r in scrub_rows])
    label = " **Smaller than the default sizes (a quick run): not for comparison.**" if quick else ""
    return (
        f"Corpora: {corpora}; stored at site A with `storescu` over {ASSOCIATIONS} associations and replicated "
        f"to B before each repetition. {session.options.repetitions} repetition(s), medians; *spread* is "
        f"(max - min) / median of the rate.{label} Machine at the start of the section: `{uptime}`.\n\n"
        "**Recover onto an empty site**: B's blob store was moved aside (renamed on the same file system; "
        "not deleted, since a mass deletion slows file creation on this disk for minutes) and an empty "
        "directory put in its place, B's services still running; then `Recovery` built as "
        "`dicomgrid recover --site B` builds it (concurrency as shipped, "
        f"{session.sites_grid().config().replication.concurrency}; no bandwidth cap), in the bench process, "
        "its plan restricted to one corpus (small first, then large into the same store). Timed by the "
        "recovery's own clock; CPU user + system per process while it ran (the bench process also runs "
        "the sampler).\n\n"
        f"{recover}\n"
        "**Scrub** of site A (`Scrubber` as `dicomgrid scrub --site A` builds it, no rate cap): timed until "
        "every copy A holds is re-hashed and its ledger `verified_at` moved; the pass is stopped before its "
        "look for missing copies (the bench keyspace outlives the sessions' blob stores, so the policy still "
        "lists earlier sessions' payloads, which no site holds). *cold*: after `sync` and "
        "`posix_fadvise(DONTNEED)` on every blob; *warm*: the pass right after.\n\n"
        f"{scrub}\n"
        "*machine CPU*: both cores while it ran (100% = both busy); *load*: 1-minute load average before it "
        "(other engineers' tests may share the machine and its Kafka and Cassandra).\n"
    )


class HealingScenario:
    key = "healing"
    title = "Self-healing: recovering an emptied site, and the scrub rate"

    def run(self, session: Session) -> Section:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        grid = session.sites_grid()
        healing = Healing(session, grid)
        specs = healing_corpora(session.options.healing_small, session.options.healing_large)
        recovers: list[RecoverRun] = []
        scrubs: list[ScrubRun] = []
        with ExitStack() as stack:
            stack.callback(healing.close)
            for repetition in range(1, session.options.repetitions + 1):
                stored = []
                for spec in specs:
                    run, uids = healing.store_replicated(session.corpus(spec))
                    run.remove()
                    stored.append((spec.name, uids))
                healing.empty_site_b()
                context_b = open_site(grid.config(), "B", "recovery")
                try:
                    for name, uids in stored:
                        recovers.append(healing.recover(context_b, name, uids, repetition))
                finally:
                    context_b.close()
                context_a = open_site(grid.config(), "A", "scrub")
                try:
                    for cache in ("cold", "warm"):
                        scrubs.append(healing.scrub(context_a, cache, repetition))
                finally:
                    context_a.close()
        recover_rows = [recover_row([r for r in recovers if r.corpus == s.name]) for s in specs]
        scrub_rows = [scrub_row([r for r in scrubs if r.cache == c]) for c in ("cold", "warm")]
        quick = session.options.healing_small < HEALING_SMALL or session.options.healing_large < HEALING_LARGE
        data = {"recover": recover_rows, "scrub": scrub_rows, "uptime": uptime,
                "recover_runs": [asdict(r) for r in recovers], "scrub_runs": [asdict(r) for r in scrubs],
                "empty_site": "B's blob store renamed aside, empty directory in its place; deleted when the session ends"}
        summary = [f"recover {r['instances']} {r['corpus']}: {r['instances_per_s']:.0f} inst/s, {r['mb_per_s']:.1f} MB/s, "
                   f"CPU {r['cpu_s'].get(RECOVERY, 0):.2f} s in the recovery"
                   + ("" if r["ok"] else " (INCOMPLETE)") for r in recover_rows]
        summary += [f"scrub ({r['cache']}): {r['mb_per_s']:.1f} MB/s, {r['cpu_s_per_gb'].get(SCRUB, 0):.1f} CPU-s/GB"
                    for r in scrub_rows]
        return Section(self.key, self.title, True, render(session, recover_rows, scrub_rows, uptime, quick), data,
                       summary=summary)
