"""The Storage SCP service of a site: every C-STORE goes through the shared ingest path.

Handlers stay thin: the data set, as pynetdicom streamed it to a file, is handed to the
:class:`~dicomgrid.producers.ingest.Ingestor`, whose outcome becomes the DIMSE status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from dicomgrid.core.events import Source
from dicomgrid.core.dimse import Context, peer_of, storage_sop_classes
from dicomgrid.producers.ingest import Expected, Ingestor

INCOMING_MAX_AGE_S = 6 * 3600


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment
    return ds


def sweep_incoming(directory: Path, max_age_s: float = INCOMING_MAX_AGE_S) -> int:
    """Remove data sets left behind by associations that died mid-transfer."""
    cutoff = time.time() - max_age_s
    removed = 0
    for path in directory.glob("*.dcm"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


class StorageService:
    """C-STORE for every storage SOP class in every transfer syntax pynetdicom can negotiate."""

    def __init__(self, ingestor: Ingestor, called_ae: str) -> None:
        self.ingestor = ingestor
        self.called_ae = called_ae
        self.spool_dir = ingestor.blobs.root / "incoming"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        sweep_incoming(self.spool_dir)

    def contexts(self) -> list[Context]:
        return [Context(uid, scu_role=True, scp_role=True) for uid in storage_sop_classes()]

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [(evt.EVT_C_STORE, self.on_store)]

    def on_store(self, event: evt.Event) -> int | Dataset:
        calling_ae, peer = peer_of(event)
        request = event.request
        source = Source("DIMSE", calling_ae, self.called_ae, peer)
        expected = Expected(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
        with Path(event.dataset_path).open("rb") as fp:
            result = self.ingestor.ingest(fp, source, expected)
        if result.ok:
            return 0x0000
        return _failure(result.outcome.status, result.error_comment)
