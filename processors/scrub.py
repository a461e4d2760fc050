"""Scrub: every copy a site holds is re-hashed, and every copy it should hold but lacks is repaired.

A pass has two parts:

1. **Local copies**, in digest order, at a capped byte rate: each one that still hashes to its name gets
   its ledger ``verified_at`` moved to now; a corrupt one is moved to ``quarantine/`` (never deleted)
   and repaired from another site's verified copy.
2. **Missing copies**: payloads the policy says the site should hold, or the ledger lists there, but the
   blob store does not have are repaired the same way.

Every finding is a ``dicom.scrub.finding`` event and an audit record; a copy that cannot be repaired no
longer counts as verified in the ledger (so replication status and Storage Commitment see the gap, and
anti-entropy asks for it again). The pass is resumable: the last digest checked is kept in a checkpoint
file, and a new pass starts after it.

Anchor: dcm4chee-arc's storage verification (its ``OBJECT_CHECKSUM`` policy) reports a bad copy; the grid
also repairs it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from dicomgrid import schemas
from dicomgrid.core.audit import MINOR_FAILURE, SERIOUS_FAILURE, AuditObject, Participant
from dicomgrid.core.config import GridConfig
from dicomgrid.core.events import InstanceRef, scrub_finding
from dicomgrid.core.kafka import PublishError
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.transfer import PayloadTransfer, PayloadUnavailable, Throttle, record_copy
from dicomgrid.processors.replication_policy import holdings

log = get_logger(__name__)


def scrub_checkpoint(config: GridConfig, site: str) -> Path:
    """Where a site's scrub keeps how far its current pass has got."""
    return config.root / "run" / "healing" / config.name / f"scrub-{site}.json"


@dataclass
class ScrubReport:
    site: str
    checked: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    corrupt: int = 0
    missing: int = 0
    repaired: int = 0
    unrepaired: list[str] = field(default_factory=list)
    complete: bool = False  # the pass reached the end (not stopped part-way)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["mb_per_s"] = round(self.bytes_checked / 1e6 / self.seconds, 1) if self.seconds else None
        return out

    def render(self) -> str:
        rate = f" ({self.bytes_checked / 1e6 / self.seconds:.1f} MB/s)" if self.seconds else ""
        lines = [f"site {self.site}: {self.checked} copies re-hashed, {self.bytes_checked / 1e6:.1f} MB in "
                 f"{self.seconds:.1f} s{rate}; {self.corrupt} corrupt, {self.missing} missing, {self.repaired} "
                 f"repaired, {len(self.unrepaired)} unrepaired"]
        lines += [f"  unrepaired: {digest}" for digest in self.unrepaired]
        return "\n".join(lines)


class Scrubber:
    def __init__(self, site: SiteContext, transfer: PayloadTransfer, checkpoint: Path, *,
                 rate_bytes_s: float | None = None) -> None:
        self.site = site
        self.transfer = transfer
        self.checkpoint = checkpoint
        self._throttle = Throttle(rate_bytes_s) if rate_bytes_s else None
        self._saved_at = 0.0

    def run(self, should_stop: Callable[[], bool] = lambda: False,
            on_progress: Callable[[int], None] = lambda n: None) -> ScrubReport:
        """One pass (from the checkpoint, if an earlier pass stopped part-way)."""
        me = self.site.site.name
        report = ScrubReport(me)
        started = time.monotonic()
        after = self._resume_point()
        for digest in sorted(self.site.blobs.digests()):
            if after is not None and digest <= after:
                continue
            if should_stop():
                self._save(after, force=True)
                report.seconds = time.monotonic() - started
                return report
            size = self._size(digest)
            if self._throttle is not None and size:
                self._throttle.take(size)
            report.checked += 1
            report.bytes_checked += size
            if self.site.blobs.verify(digest):
                self.site.ledger.mark_verified(self.site.blobs.ref(digest))
            else:
                report.corrupt += 1
                moved = self.site.blobs.quarantine(digest)
                self._repair(digest, "corrupt", None, report, quarantined=str(moved) if moved else None)
            self._save(digest)
            after = digest
            on_progress(size)
        expected = {h.sha256: h.instance for h in holdings(self.site.config, self.site.index, me)}
        listed = {r.sha256 for r in self.site.ledger.all_replicas() if r.site == me}
        for digest in sorted(set(expected) | listed):
            if should_stop():
                report.seconds = time.monotonic() - started
                return report
            if not self.site.blobs.exists(digest):
                report.missing += 1
                self._repair(digest, "missing", expected.get(digest), report)
        self.checkpoint.unlink(missing_ok=True)
        report.complete = True
        report.seconds = time.monotonic() - started
        log.info("scrub pass done", **{k: v for k, v in report.as_dict().items() if k != "unrepaired"},
                 unrepaired=len(report.unrepaired))
        return report

    def _repair(self, digest: str, finding: Literal["missing", "corrupt"], instance: InstanceRef | None,
                report: ScrubReport, quarantined: str | None = None) -> None:
        me = self.site.site.name
        try:
            peer, blob = self.transfer.fetch_from_any(digest, resumable=True)
        except PayloadUnavailable as exc:
            self.site.ledger.mark_unverified(digest, me)
            report.unrepaired.append(digest)
            self._found(digest, finding, None, quarantined, str(exc))
            return
        record_copy(self.site, blob, peer.name, instance, cause="scrub")
        report.repaired += 1
        self._found(digest, finding, peer.name, quarantined, None)

    def _found(self, digest: str, finding: Literal["missing", "corrupt"], repaired_from: str | None,
               quarantined: str | None, reason: str | None) -> None:
        me = self.site.site
        event = scrub_finding(me.name, digest, finding, repaired_from=repaired_from, quarantined=quarantined,
                              reason=reason)
        outcome = "repaired from site " + repaired_from if repaired_from else "not repaired: " + (reason or "")
        log.error("scrub finding", site=me.name, sha256=digest, finding=finding, outcome=event["outcome"],
                  repaired_from=repaired_from)
        self.site.audit.record(
            "U" if repaired_from else "E",
            "DICOM Instances Transferred" if repaired_from else "Security Alert",
            MINOR_FAILURE if repaired_from else SERIOUS_FAILURE,
            f"scrub: local copy {finding}; {outcome}",
            [Participant(me.name, False, me.ae_title, None, "Destination"),
             *([Participant(repaired_from, False, None, None, "Source")] if repaired_from else [])],
            [AuditObject("payload", digest, {"finding": finding})],
        )
        if self.site.publisher is not None:
            try:
                self.site.publisher.publish_and_wait(schemas.TOPIC_SCRUB_FINDING, digest, event)
            except PublishError as exc:
                log.warning("scrub finding not announced", sha256=digest, error=str(exc))

    def _size(self, digest: str) -> int:
        try:
            return self.site.blobs.size(digest)
        except FileNotFoundError:
            return 0

    def _resume_point(self) -> str | None:
        try:
            return json.loads(self.checkpoint.read_text())["after"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _save(self, digest: str | None, *, force: bool = False) -> None:
        """Remember that every copy up to ``digest`` was checked.

        Written every few seconds rather than per copy: a crash re-checks at most the copies since.
        """
        now = time.monotonic()
        if digest is None or not force and now - self._saved_at < 2.0:
            return
        self._saved_at = now
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_suffix(".tmp")
        tmp.write_text(json.dumps({"after": digest}))
        tmp.replace(self.checkpoint)
