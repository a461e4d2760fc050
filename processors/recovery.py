"""Rebuilding what a site should hold: `dicomgrid recover` (a lost disk) and the anti-entropy sweep.

Both start from the policy applied to the index (:func:`~dicomgrid.processors.replication_policy.holdings`):
every version of every instance, and which sites should hold its payload.

- **Recovery** fetches every payload the site lacks from the other sites, directly, several at a time,
  within a bandwidth cap, with the same verification and durability as replication. It is resumable:
  every payload settled is appended to a checkpoint file, so after Ctrl-C or a crash a rerun skips
  them without re-hashing.
- **Anti-entropy** compares the same holdings with the ledger and publishes a
  ``dicom.replication.requested`` for every copy a site should hold and the ledger does not list as
  verified, so an outage longer than the replication topic's retention, or a request that ended in
  ``dicom.replication.failed``, still heals through the site's replication worker.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobBusy, BlobRef
from dicomgrid.core.events import replication_requested
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.transfer import PayloadTransfer, PayloadUnavailable, record_copy
from dicomgrid.processors.replication_policy import Holding, holdings

log = get_logger(__name__)

# Holdings whose ledger rows a sweep looks up together (ReplicaLedger.verified_sites_of).
SWEEP_CHUNK = 1000


@dataclass
class RecoveryReport:
    site: str
    planned: int = 0  # distinct payloads the site should hold
    held: int = 0  # already there and intact (or settled by an earlier, interrupted run)
    copied: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0
    failed: Counter[str] = field(default_factory=Counter)  # reason -> payloads
    unavailable: list[str] = field(default_factory=list)  # digests no other site could provide (first 1,000)

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["failed"] = dict(self.failed)
        out["instances_per_s"] = round(self.copied / self.seconds, 1) if self.seconds else None
        out["mb_per_s"] = round(self.bytes_copied / 1e6 / self.seconds, 2) if self.seconds else None
        return out

    def render(self) -> str:
        rate = (f", {self.copied / self.seconds:.1f} inst/s, {self.bytes_copied / 1e6 / self.seconds:.1f} MB/s"
                if self.seconds and self.copied else "")
        lines = [f"site {self.site}: {self.planned} payload(s) to hold; {self.held} already held, {self.copied} "
                 f"copied ({self.bytes_copied / 1e6:.1f} MB) in {self.seconds:.1f} s{rate}"]
        lines += [f"  failed: {n} x {reason}" for reason, n in self.failed.most_common()]
        return "\n".join(lines)


def _reason(exc: BaseException) -> str:
    """A failure's reason, grouped for the summary (the details go to the log)."""
    if isinstance(exc, PayloadUnavailable):
        return "no intact copy at any other site"
    if isinstance(exc, BlobBusy):
        return "another transfer of the payload was running"
    return type(exc).__name__


class Recovery:
    """Rebuilds the payloads one site should hold from the other sites."""

    def __init__(self, site: SiteContext, transfer: PayloadTransfer, checkpoint: Path, *, concurrency: int = 4) -> None:
        self.site = site
        self.transfer = transfer
        self.checkpoint = checkpoint
        self.concurrency = concurrency
        self._lock = threading.Lock()

    def plan(self) -> tuple[list[Holding], int]:
        """The distinct payloads to settle, and how many more an earlier, interrupted run settled."""
        done = set(self.checkpoint.read_text().split()) if self.checkpoint.exists() else set()
        seen: dict[str, Holding] = {}
        for holding in holdings(self.site.config, self.site.index, self.site.site.name):
            seen.setdefault(holding.sha256, holding)
        return [h for digest, h in seen.items() if digest not in done], len(done & set(seen))

    def run(self, plan: list[Holding], already: int = 0,
            on_progress: Callable[[Holding], None] = lambda h: None) -> RecoveryReport:
        report = RecoveryReport(self.site.site.name, planned=len(plan) + already, held=already)
        started = time.monotonic()
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        with self.checkpoint.open("a") as done, ThreadPoolExecutor(self.concurrency, "recover") as pool:
            for holding, outcome in zip(plan, pool.map(self._settle, plan)):
                with self._lock:
                    if isinstance(outcome, BaseException):
                        report.failed[_reason(outcome)] += 1
                        if isinstance(outcome, PayloadUnavailable) and len(report.unavailable) < 1000:
                            report.unavailable.append(holding.sha256)
                    else:
                        done.write(holding.sha256 + "\n")
                        done.flush()
                        if outcome is None:
                            report.held += 1
                        else:
                            report.copied += 1
                            report.bytes_copied += outcome.size
                on_progress(holding)
        report.seconds = time.monotonic() - started
        if report.ok:
            self.checkpoint.unlink(missing_ok=True)
        return report

    def _settle(self, holding: Holding) -> BlobRef | None | BaseException:
        """None if the site already holds it intact; the new copy; or why it could not be had."""
        blobs, me = self.site.blobs, self.site.site.name
        try:
            if blobs.verify(holding.sha256):
                if me not in self.site.ledger.verified_sites(holding.sha256):
                    self.site.ledger.mark_verified(blobs.ref(holding.sha256))
                return None
            peer, blob = self.transfer.fetch_from_any(holding.sha256, prefer=[holding.origin], resumable=True)
            record_copy(self.site, blob, peer.name, holding.instance, cause="recovery")
            return blob
        except Exception as exc:  # one payload's failure must not stop the others
            log.warning("payload not recovered", site=me, sha256=holding.sha256, error=str(exc))
            return exc


@dataclass
class SweepReport:
    site: str
    checked: int = 0
    requested: int = 0
    unavailable: int = 0  # no site holds a verified copy to copy from

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def sweep(site: SiteContext, *, requested_by: str = "anti-entropy") -> SweepReport:
    """Request every copy ``site`` should hold and the ledger does not list as verified there."""
    me = site.site.name
    report = SweepReport(me)
    seen: set[str] = set()
    batch: list[tuple[str, dict[str, object]]] = []
    pending = _distinct(holdings(site.config, site.index, me), seen)
    while chunk := list(itertools.islice(pending, SWEEP_CHUNK)):
        ledger = site.ledger.verified_sites_of([holding.sha256 for holding in chunk])
        for holding in chunk:
            report.checked += 1
            verified = ledger[holding.sha256]
            if me in verified:
                continue
            sources = [holding.origin, *sorted(verified)]
            source = next((s for s in sources if s in verified), None)
            if source is None:
                report.unavailable += 1
                log.error("no verified copy anywhere to copy from", site=me, sha256=holding.sha256)
                continue
            payload = BlobRef(source, holding.sha256, holding.size or 1).as_payload()
            batch.append((holding.sha256, replication_requested(payload, me, holding.instance)))
            report.requested += 1
    assert site.publisher is not None
    futures = [site.publisher.publish(schemas.TOPIC_REPLICATION_REQUESTED, key, event) for key, event in batch]
    for future in futures:
        future.result(timeout=60)
    if report.requested or report.unavailable:
        log.info("anti-entropy sweep", requested_by=requested_by, **report.as_dict())
    return report


def _distinct(items: Iterable[Holding], seen: set[str]) -> Iterator[Holding]:
    for item in items:
        if item.sha256 not in seen:
            seen.add(item.sha256)
            yield item
