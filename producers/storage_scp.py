"""The Storage SCP service of a site: every C-STORE goes through the shared ingest path.

Associations that only store are served by the storage path (:mod:`dicomgrid.producers.storage_path`),
which the site AE asks this service for. C-STOREs that arrive on pynetdicom's associations (those that
also query or retrieve) come to :meth:`on_store`: the
data set, as pynetdicom streamed it to a file, is handed to the
:class:`~dicomgrid.producers.ingest.Ingestor`, whose outcome becomes the DIMSE status. What an
association stored is audited in one record when its connection closes, as on the storage path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from dicomgrid.core import metrics
from dicomgrid.core.events import Source
from dicomgrid.core.dimse import Context, peer_of, storage_sop_classes
from dicomgrid.producers.ingest import Expected, Ingestor
from dicomgrid.producers.storage_path import StoragePath
from dicomgrid.producers.store_audit import StoreAudit

def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment
    return ds


class StorageService:
    """C-STORE for every storage SOP class in every transfer syntax pynetdicom can negotiate."""

    def __init__(self, ingestor: Ingestor, called_ae: str) -> None:
        self.ingestor = ingestor
        self.called_ae = called_ae
        # The site AE spools received data sets here (a folder per receiver process) and sweeps it.
        self.spool_dir = ingestor.blobs.root / "incoming"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._stores: dict[Any, StoreAudit] = {}  # by association, until its connection closes
        self._lock = threading.Lock()

    def contexts(self) -> list[Context]:
        return [Context(uid, scu_role=True, scp_role=True) for uid in storage_sop_classes()]

    def direct_path(self, *, max_pdu: int, network_timeout_s: float) -> StoragePath:
        return StoragePath(self.ingestor, self.called_ae, max_pdu=max_pdu, network_timeout_s=network_timeout_s,
                           storage_classes=storage_sop_classes())

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [(evt.EVT_C_STORE, metrics.timed_handler(self.ingestor.site, "C-STORE", self.on_store)),
                (evt.EVT_CONN_CLOSE, self.on_closed)]

    def on_store(self, event: evt.Event) -> int | Dataset:
        calling_ae, peer = peer_of(event)
        request = event.request
        source = Source("DIMSE", calling_ae, self.called_ae, peer)
        expected = Expected(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
        with self._lock:
            stores = self._stores.get(event.assoc)
            if stores is None:
                stores = self._stores[event.assoc] = StoreAudit(self.ingestor.audit, self.ingestor.site, source)
        with Path(event.dataset_path).open("rb") as fp:
            result = self.ingestor.ingest(fp, source, expected, stores)
        if result.ok:
            return 0x0000
        return _failure(result.outcome.status, result.error_comment)

    def on_closed(self, event: evt.Event) -> None:
        with self._lock:
            stores = self._stores.pop(event.assoc, None)
        if stores is not None:
            stores.flush()
