"""A site's replication worker: ``dicom.replication.requested`` for this site -> a verified local copy.

Each site runs one worker in a consumer group of its own (``<grid>-replication-<site>``), so every site
sees every request and serves those addressed to it. For each one it pulls the payload over the payload
transfer service (:mod:`dicomgrid.core.transfer`) from the site that received it, else from any site
holding a copy, verifies the SHA-256 end to end before the copy is named, commits it with ingest's
durability, announces ``dicom.replica.stored`` and records the copy in the ledger. Requests that arrive
together share the work: their small payloads come from their source site in one batch transfer (up
to 64 a request), their events are awaited together and their ledger rows written in one round; a
large payload, and any the batch did not bring, is fetched on its own.

The copies fetched from one peer are audited together, one DICOM Instances Transferred record for up
to 1,000 of them (:mod:`dicomgrid.core.transfer_audit`: each copy's own record is held in the spool until
the collected one is confirmed); a failure is audited at once, on its own.

Redelivery is idempotent: a payload already held and verified here, with its ledger row, is skipped; the
blob store is content-addressed and ledger rows are keyed by (digest, site), so nothing is ever stored
or recorded twice. A transfer cut by a crash resumes from the bytes already written. Failures retry
with capped exponential backoff and jitter (tenacity); after ``replication.max_attempts`` the request
goes to ``dicom.replication.failed`` (``retryable``: the repair path takes it up later).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from dicomgrid import schemas
from dicomgrid.core import metrics
from dicomgrid.core.audit import SERIOUS_FAILURE, AuditObject, Participant
from dicomgrid.core.blobstore import BlobBusy, BlobRef
from dicomgrid.core.config import GridConfig
from dicomgrid.core.events import InstanceRef, replication_failed
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext, open_site
from dicomgrid.core.transfer import (
    BATCH_MAX,
    WHOLE_BODY_BYTES,
    PayloadTransfer,
    PayloadUnavailable,
    record_copies,
    record_copy,
)
from dicomgrid.core.transfer_audit import TransferAudit, TransferAudits
from dicomgrid.processors.app import RETRY_S, connect_cassandra, faust_app, raw_topic
from dicomgrid.processors.dead_letters import DeadLetters, Rejected, decode
from dicomgrid.processors.healing_schedule import Schedule
from dicomgrid.processors.recovery import sweep
from dicomgrid.processors.scrub import Scrubber, scrub_checkpoint

log = get_logger(__name__)


def replication_group(config: GridConfig, site: str) -> str:
    return f"{config.name}-replication-{site}"


class Done(enum.Enum):
    COPIED = "copied"
    ALREADY_HELD = "already held"
    FAILED = "failed"


class Replicator:
    """Serves one site's replication requests (blocking; one call per request, several at once)."""

    def __init__(self, site: SiteContext, transfer: PayloadTransfer) -> None:
        self.site = site
        self.transfer = transfer
        policy = site.config.replication
        self._retrying = dict(
            stop=stop_after_attempt(policy.max_attempts),
            wait=wait_exponential_jitter(initial=policy.backoff_initial_s, max=policy.backoff_max_s),
            # BlobBusy: the same payload is being fetched by another request right now; wait for it.
            retry=retry_if_exception_type((PayloadUnavailable, BlobBusy)),
            reraise=True,
        )
        # By the site copied from.
        self._copies = TransferAudits(lambda source_site: TransferAudit(
            site.audit, self._participants(source_site), f"replicas fetched from site {source_site} and verified"))

    def handle(self, request: dict[str, Any]) -> Done:
        digest = request["source"]["sha256"]
        instance = InstanceRef.of_event(request)
        if self._held(digest, request):
            return Done.ALREADY_HELD
        attempts = 0
        try:
            for attempt in Retrying(**self._retrying):
                with attempt:
                    attempts += 1
                    if attempts > 1 and self._held(digest, request):  # a concurrent duplicate got it
                        return Done.ALREADY_HELD
                    peer, blob = self.transfer.fetch_from_any(digest, prefer=[request["source"]["site"]],
                                                              resumable=True)
        except (PayloadUnavailable, BlobBusy) as exc:
            self._failed(request, attempts, str(exc))
            return Done.FAILED
        record_copy(self.site, blob, peer.name, instance, cause="replication", request_event_id=request["event_id"])
        # At debug, as ingest logs each instance it stores: a line per copy in the service log cost more
        # of the worker's CPU than the ledger write; copies are counted in the metrics and the audit trail.
        log.debug("replica stored", sha256=digest, from_site=peer.name, size=blob.size, attempts=attempts)
        self._audit_copy(request, peer.name)
        return Done.COPIED

    def handle_batch(self, requests: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], Done]]:
        """Serve several requests: small payloads from the same source site in batch transfers (one
        request per :data:`~dicomgrid.core.transfer.BATCH_MAX` of them), the rest, and every payload a
        batch did not bring, one at a time through :meth:`handle` with its retries."""
        done: list[tuple[dict[str, Any], Done]] = []
        alone: list[dict[str, Any]] = []
        batches: dict[str, dict[str, dict[str, Any]]] = {}  # source site -> digest -> request
        configured = {s.name for s in self.site.config.sites} - {self.site.site.name}
        for request in requests:
            source = request["source"]
            digest, site = source["sha256"], source["site"]
            if self._held(digest, request):
                done.append((request, Done.ALREADY_HELD))
            elif source["size"] > WHOLE_BODY_BYTES or site not in configured or digest in batches.get(site, {}):
                alone.append(request)
            else:
                batches.setdefault(site, {})[digest] = request
        for site, wanted in batches.items():
            peer = self.site.config.site(site)
            digests = list(wanted)
            for start in range(0, len(digests), BATCH_MAX):
                chunk = digests[start:start + BATCH_MAX]
                fetched = self.transfer.fetch_batch(peer, chunk)
                copies = [(wanted[d], blob) for d in chunk if isinstance(blob := fetched.get(d), BlobRef)]
                alone += [wanted[d] for d in chunk if not isinstance(fetched.get(d), BlobRef)]
                record_copies(self.site, [(blob, InstanceRef.of_event(r), r["event_id"]) for r, blob in copies],
                              site, cause="replication")
                for request, _ in copies:
                    self._audit_copy(request, site)
                    done.append((request, Done.COPIED))
        done += [(request, self.handle(request)) for request in alone]
        return done

    def _held(self, digest: str, request: dict[str, Any]) -> bool:
        """Whether this site already holds a verified copy; a copy the ledger misses is recorded now."""
        if not self.site.blobs.verify(digest):
            return False
        if self.site.site.name not in self.site.ledger.verified_sites(digest):
            # Made by an earlier delivery that stopped before recording it (Kafka or Cassandra failed, or
            # the worker died, after the payload was durable): its copy was never audited either, since
            # a copy is audited once recorded.
            source_site = request["source"]["site"]
            record_copy(self.site, self.site.blobs.ref(digest), source_site,
                        InstanceRef.of_event(request), cause="replication", request_event_id=request["event_id"])
            self._audit_copy(request, source_site)
        return True

    def _failed(self, request: dict[str, Any], attempts: int, reason: str) -> None:
        failed = {**request, "attempt": request["attempt"] + attempts - 1}
        assert self.site.publisher is not None
        self.site.publisher.publish_and_wait(
            schemas.TOPIC_REPLICATION_FAILED, request["source"]["sha256"],
            replication_failed(failed, reason, retryable=True),
        )
        log.error("replication failed; left to the repair path", sha256=request["source"]["sha256"],
                  attempts=attempts, reason=reason)
        self._audit(SERIOUS_FAILURE, f"replication failed after {attempts} attempt(s): {reason}", request,
                    request["source"]["site"])

    def _participants(self, source_site: str) -> list[Participant]:
        me = self.site.site
        return [Participant(source_site, False, None, None, "Source"),
                Participant(me.name, True, me.ae_title, None, "Destination")]

    @staticmethod
    def _objects(request: dict[str, Any]) -> list[AuditObject]:
        instance = InstanceRef.of_event(request)
        return [AuditObject("study", instance.study_uid),
                AuditObject("instance", instance.sop_instance_uid, {"sop_class_uid": instance.sop_class_uid}),
                AuditObject("payload", request["source"]["sha256"])]

    def _audit(self, outcome: int, description: str, request: dict[str, Any], source_site: str) -> None:
        self.site.audit.record("C", "DICOM Instances Transferred", outcome, description,
                               self._participants(source_site), self._objects(request))

    def _audit_copy(self, request: dict[str, Any], source_site: str) -> None:
        instance = InstanceRef.of_event(request)
        self._copies[source_site].add(
            study_uid=instance.study_uid, sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid, description=f"replica fetched from site {source_site} and verified",
            objects=self._objects(request))


def _observe(site: str, request: dict[str, Any], done: Done) -> None:
    metrics.REPLICATION_COPIES.labels(site, done.name.lower()).inc()
    received_at = InstanceRef.of_event(request).received_at
    if done is Done.COPIED and received_at:
        lag = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(received_at)
        metrics.REPLICATION_LAG.labels(site).observe(lag.total_seconds())


def _backlog(config: GridConfig, site: str) -> int:
    """Replication requests the site's worker has not committed yet (every site's worker reads every
    request, so this counts the others' too: it is how far behind the worker is)."""
    from dicomgrid.processors.replication_status import TopicReader

    reader = TopicReader(config)
    try:
        return reader.lag(schemas.TOPIC_REPLICATION_REQUESTED, replication_group(config, site))
    finally:
        reader.close()


def site_transfer(site: SiteContext, bandwidth_mb_s: float | None = None) -> PayloadTransfer:
    """The payload transfer client of a site's healing jobs, with the replication policy's timeouts."""
    policy = site.config.replication
    rate = bandwidth_mb_s or policy.bandwidth_mb_s
    return PayloadTransfer(site, connect_timeout_s=policy.connect_timeout_s, read_timeout_s=policy.read_timeout_s,
                           bandwidth_bytes_s=rate * 1e6 if rate else None)


def build_replicator(config: GridConfig, site_name: str, db: Any) -> Replicator:
    context = open_site(config, site_name, "replication", db)
    return Replicator(context, site_transfer(context))


# How long an actor waits for more requests to come with the first one (they share a batch transfer).
REQUESTS_WITHIN_S = 0.1
HEALING_CHECK_S = 60.0
BACKLOG_CHECK_S = 15.0


class _Healing:
    """The site's background scrub and anti-entropy sweep (see :mod:`dicomgrid.processors.healing_schedule`)."""

    def __init__(self, config: GridConfig, site: str) -> None:
        state = config.root / "run" / "healing" / config.name
        self.scrub_checkpoint = scrub_checkpoint(config, site)
        self.scrub = Schedule(state / f"scrub-{site}.last", config.healing.scrub_period_h * 3600)
        self.sweep = Schedule(state / f"sweep-{site}.last", config.healing.sweep_period_min * 60)
        self.rate = config.healing.scrub_rate_mb_s * 1e6
        self.stopping = False
        self._busy = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="healing")

    async def maybe_run(self, worker: Replicator) -> None:
        if self._busy:
            return
        loop = asyncio.get_running_loop()
        self._busy = True
        try:
            if self.sweep.due():
                await loop.run_in_executor(self._thread, sweep, worker.site)
                self.sweep.done()
            if self.scrub.due(interrupted=self.scrub_checkpoint.exists()):
                scrubber = Scrubber(worker.site, worker.transfer, self.scrub_checkpoint, rate_bytes_s=self.rate)
                report = await loop.run_in_executor(self._thread, lambda: scrubber.run(lambda: self.stopping))
                if report.complete:
                    self.scrub.done()
        except Exception as exc:  # Kafka or Cassandra away: tried again at the next check
            log.warning("background healing stopped; it runs again at the next check", error=str(exc))
        finally:
            self._busy = False


def create_replicator_app(config: GridConfig, site: str) -> faust.App:
    # With a Kafka cluster per site: the site's own cluster, its own requests and the mirrored ones of
    # the other sites (a request is made where its instance arrived).
    config = config.for_site(site)
    site_config = config.site(site)
    app = faust_app(config, replication_group(config, site_config.name),
                    config.root / "processors" / config.name / f"replication-{site_config.name}")
    requests = raw_topic(app, config, schemas.TOPIC_REPLICATION_REQUESTED, site=site_config.name)
    concurrency = config.replication.concurrency
    threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="replication")
    state: dict[str, Any] = {}
    ready = asyncio.Lock()

    async def replicator() -> tuple[Replicator, DeadLetters]:
        async with ready:
            if "worker" not in state:
                db = await connect_cassandra(config, site_config.cassandra_dc)
                worker = build_replicator(config, site_config.name, db)
                worker.site.application_activity("replicator", started=True)
                assert worker.site.publisher is not None
                state["worker"] = worker, DeadLetters(worker.site.publisher, f"replication-{site_config.name}")
        return state["worker"]

    # Each of the `concurrency` actors takes the requests that arrived together, up to a batch transfer's
    # worth (Replicator.handle_batch); faust commits an offset only once every request before it in its
    # partition has been handled.
    @app.agent(requests, name="replicator", concurrency=concurrency)
    async def replicate(stream: faust.Stream) -> None:
        worker, dead = await replicator()
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(BATCH_MAX, within=REQUESTS_WITHIN_S):
            mine = []
            for event in events:
                try:
                    request = decode(event.message.value, schemas.TOPIC_REPLICATION_REQUESTED)
                except Rejected as exc:
                    # Every site's worker sees every request; the first configured site records the bad ones.
                    if site_config.name == config.sites[0].name:
                        await dead.send(event.message, str(exc))
                    continue
                if request["target_site"] == site_config.name:
                    mine.append(request)
            while mine:
                try:
                    # Settled again as a whole after a failure: what was copied is found held.
                    for request, done in await loop.run_in_executor(threads, worker.handle_batch, mine):
                        _observe(site_config.name, request, done)
                    break
                except Exception as exc:  # Kafka or Cassandra unavailable: hold the offsets and retry
                    log.warning("replication requests not settled; retrying", requests=len(mine), error=str(exc))
                    await asyncio.sleep(RETRY_S)

    healing = _Healing(config, site_config.name)

    @app.timer(BACKLOG_CHECK_S)
    async def backlog() -> None:
        try:
            pending = await asyncio.get_running_loop().run_in_executor(None, _backlog, config, site_config.name)
        except Exception as exc:  # Kafka away: the gauge keeps its last value until it answers again
            log.debug("replication backlog unknown", error=str(exc))
            return
        metrics.REPLICATION_BACKLOG.labels(site_config.name).set(pending)

    @app.timer(HEALING_CHECK_S)
    async def heal() -> None:
        if "worker" not in state:
            return
        worker, _ = state["worker"]
        await healing.maybe_run(worker)

    @app.on_before_shutdown.connect
    async def _flush(app: faust.App, **kwargs: Any) -> None:
        healing.stopping = True
        if "worker" in state:
            worker, _ = state["worker"]
            worker.site.application_activity("replicator", started=False)
            worker.site.publisher.flush()
            worker.site.audit.flush()

    return app
