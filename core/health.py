"""What a site's services need to work, checked for real: Kafka answers, its Cassandra datacenter
answers, its blob store takes a durable write.

``/health`` (readiness: every dependency) answers 503 naming what failed; ``/health/live`` answers
while the process serves at all, so an orchestrator does not restart a service for an outage of
something else. Results are kept for :data:`CACHE_S`, so probes cannot pile load on the dependencies.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka.admin import AdminClient

from dicomgrid import schemas
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext

log = get_logger(__name__)

CACHE_S = 2.0
TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail, "seconds": round(self.seconds, 4)}


class HealthChecks:
    """The dependency checks of one site's process."""

    def __init__(self, context: SiteContext) -> None:
        self.context = context
        self._admin = AdminClient(context.config.kafka.client_config())
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Check]] | None = None

    def run(self) -> list[Check]:
        """Every check (blocking, at most a few seconds; cached briefly)."""
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < CACHE_S:
                return self._cached[1]
            checks = [self._timed(name, probe) for name, probe in (
                ("kafka", self._kafka), ("cassandra", self._cassandra), ("blob_store", self._blob_store))]
            for check in checks:
                if not check.ok:
                    log.warning("health check failed", check=check.name, detail=check.detail)
            self._cached = (time.monotonic(), checks)
            return checks

    @staticmethod
    def _timed(name: str, probe: Callable[[], str]) -> Check:
        started = time.perf_counter()
        try:
            detail, ok = probe(), True
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}"[:300], False
        return Check(name, ok, detail, time.perf_counter() - started)

    def _kafka(self) -> str:
        metadata = self._admin.list_topics(timeout=TIMEOUT_S)
        if not metadata.brokers:
            raise RuntimeError("no broker answered")
        topic = self.context.config.kafka.topic
        missing = [t for t in (topic(name) for name in schemas.topics()) if t not in metadata.topics]
        if missing:
            raise RuntimeError(f"topics missing: {', '.join(missing)}")
        return f"{len(metadata.brokers)} broker(s)"

    def _cassandra(self) -> str:
        row = self.context.db.session.execute(
            "SELECT data_center, release_version FROM system.local", timeout=TIMEOUT_S).one()
        local = self.context.site.cassandra_dc
        if row.data_center != local:
            return f"served by {row.data_center} (datacenter {local} not answering), Cassandra {row.release_version}"
        return f"{row.data_center}, Cassandra {row.release_version}"

    def _blob_store(self) -> str:
        # A durable write where payloads are written (the same file system), then gone again.
        probe = self.context.blobs.root / "tmp" / f"health-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            with probe.open("wb") as fp:
                fp.write(b"health")
                fp.flush()
                os.fsync(fp.fileno())
        finally:
            probe.unlink(missing_ok=True)
        stat = os.statvfs(self.context.blobs.root)
        return f"{stat.f_bavail * stat.f_frsize / 2**30:.1f} GiB free"

