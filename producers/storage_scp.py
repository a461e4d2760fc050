"""A site's DICOM receiver: Verification and Storage SCP (C-ECHO, C-STORE) on the site's AE.

Handlers stay thin: every C-STORE is handed, as the file pynetdicom streamed it to, to the shared
:class:`~dicomgrid.producers.ingest.Ingestor`, whose outcome becomes the DIMSE status.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomgrid.core.audit import MINOR_FAILURE, SUCCESS, Participant
from dicomgrid.core.config import GridConfig
from dicomgrid.core.events import Source
from dicomgrid.core.logging import get_logger
from dicomgrid.producers.ingest import Expected, Ingestor

log = get_logger(__name__)

# Received data sets are streamed to a file, never held in memory: memory stays flat for 1 GB instances.
_config.STORE_RECV_CHUNKED_DATASET = True
# Each received PDU is held in memory whole; this bounds it while keeping per-PDU overhead low.
MAX_PDU_BYTES = 256 * 1024
INCOMING_MAX_AGE_S = 6 * 3600


class _ReusePortServer(ThreadedAssociationServer):
    """Lets several receiver processes accept on one port; the kernel spreads associations."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _set_nodelay(event: evt.Event) -> None:
    # Without TCP_NODELAY every DIMSE response waits on the peer's delayed ACK.
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _peer(event: evt.Event) -> tuple[str | None, str | None]:
    requestor = event.assoc.requestor
    return (requestor.ae_title or None), f"{requestor.address}:{requestor.port}"


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    # ErrorComment is LO: at most 64 characters, no backslash.
    ds.ErrorComment = comment.replace("\\", "/")[:64]
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


class StorageSCP:
    """The receiver of one site."""

    def __init__(self, config: GridConfig, site: str, ingestor: Ingestor) -> None:
        self.config = config
        self.site = config.site(site)
        self.ingestor = ingestor
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.site.ae_title)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.maximum_associations = 64
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.require_called_aet = True
        if not (self.config.security.allow_any_calling_ae and not self.config.security.allowed_calling_aes):
            ae.require_calling_aet = list(self.config.security.allowed_calling_aes)
        return ae

    @property
    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_CONN_OPEN, _set_nodelay),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
        ]

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_rejected(self, event: evt.Event) -> None:
        calling_ae, peer = _peer(event)
        self.ingestor.audit.record(
            "E",
            "Security Alert",
            MINOR_FAILURE,
            f"association rejected: calling AE {calling_ae!r} not allowed or called AE wrong",
            [Participant(calling_ae or "unknown", True, calling_ae, peer, "Requestor")],
        )

    def _on_store(self, event: evt.Event) -> int | Dataset:
        calling_ae, peer = _peer(event)
        request = event.request
        source = Source("DIMSE", calling_ae, self.site.ae_title, peer)
        expected = Expected(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
        with Path(event.dataset_path).open("rb") as fp:
            result = self.ingestor.ingest(fp, source, expected)
        if result.ok:
            return 0x0000
        return _failure(result.outcome.status, f"{result.outcome.text}: {result.detail}")

    def serve(self, *, reuse_port: bool = False, block: bool = True) -> ThreadedAssociationServer:
        """Listen on the site's DICOM address; blocks unless ``block`` is false."""
        incoming = self.ingestor.blobs.root / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        sweep_incoming(incoming)
        # pynetdicom streams each data set to a NamedTemporaryFile: keep those on the site's volume.
        tempfile.tempdir = str(incoming)
        server = self.ae.make_server(
            (self.site.dicom_host, self.site.dicom_port),
            evt_handlers=self.handlers,
            server_class=_ReusePortServer if reuse_port else ThreadedAssociationServer,
        )
        self.ae._servers.append(server)
        log.info(
            "storage scp listening",
            site=self.site.name,
            ae_title=self.site.ae_title,
            address=f"{self.site.dicom_host}:{self.site.dicom_port}",
        )
        if block:
            try:
                server.serve_forever()
            finally:
                server.shutdown()
        else:
            import threading

            threading.Thread(target=server.serve_forever, name=f"scp-{self.site.name}", daemon=True).start()
        return server

    def shutdown(self) -> None:
        self.ae.shutdown()
