"""A site's DICOM application entity: one AE title and port, several services.

Services plug in by offering presentation contexts and event handlers (see :class:`DimseService`):
storage (``producers``) and query/retrieve (``consumers``) share the association, as a PACS expects.
"""

from __future__ import annotations

import copy
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom._uid_dict import UID_dictionary
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt, register_uid
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomgrid.core.audit import MINOR_FAILURE, AuditTrail, Participant
from dicomgrid.core.config import GridConfig
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

# Each received PDU is held in memory whole; this bounds it while keeping per-PDU overhead low.
MAX_PDU_BYTES = 256 * 1024
MAX_ASSOCIATIONS = 64

_STORAGE_BRANCH = "1.2.840.10008.5.1.4.1.1."


def _register_unlisted_storage_classes() -> list[str]:
    """Storage SOP classes pydicom knows and pynetdicom does not list (mostly retired ones).

    Archives hold images from modalities decades old: retired Ultrasound (``...1.1.6``), Nuclear
    Medicine, X-Ray Bi-plane, the trial SR classes. pynetdicom leaves them out of its storage service,
    so a site would refuse their presentation contexts; they are registered with it here, under
    pydicom's keywords. Ingest still refuses any that lack the UIDs the grid files instances under.
    """
    added = []
    for uid, (name, kind, _info, _retired, keyword) in UID_dictionary.items():
        if kind != "SOP Class" or not uid.startswith(_STORAGE_BRANCH) or "Storage" not in name or not keyword:
            continue
        if uid_to_service_class(uid) is ServiceClass:
            register_uid(uid, keyword, StorageServiceClass)
            added.append(uid)
    return added


UNLISTED_STORAGE_CLASSES = _register_unlisted_storage_classes()


def storage_sop_classes() -> list[str]:
    """Every storage SOP class a site stores and sends (C-STORE, and C-GET/C-MOVE sub-operations)."""
    return [cx.abstract_syntax for cx in AllStoragePresentationContexts] + UNLISTED_STORAGE_CLASSES


@dataclass(frozen=True)
class Context:
    """A presentation context a service accepts (``scu_role`` for C-GET's storage sub-operations)."""

    abstract_syntax: str
    transfer_syntaxes: Sequence[str] = tuple(ALL_TRANSFER_SYNTAXES)
    scu_role: bool | None = None
    scp_role: bool | None = None


class DimseService(Protocol):
    def contexts(self) -> list[Context]: ...

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]: ...


class _ReusePortServer(ThreadedAssociationServer):
    """Lets several processes accept on one port; the kernel spreads associations over them."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _CheapCopyContext(PresentationContext):
    """A supported presentation context that copies in microseconds.

    pynetdicom deep-copies the server's supported contexts for every association. For a site's ~190
    contexts of ~45 transfer syntaxes each that took ~40 ms with the GIL held, per association. The only
    state a context's copy needs of its own is its list of transfer syntaxes (UIDs are immutable).
    """

    @classmethod
    def of(cls, context: PresentationContext) -> "_CheapCopyContext":
        cheap = cls()
        cheap.__dict__.update(vars(context))
        return cheap

    def __deepcopy__(self, memo: dict[int, Any]) -> "_CheapCopyContext":
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def set_nodelay(event: evt.Event) -> None:
    # Without TCP_NODELAY every DIMSE response waits on the peer's delayed ACK.
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def prefer_requested_syntaxes(event: evt.Event) -> None:
    """Accept, in each presentation context, the transfer syntax the requestor prefers.

    pynetdicom accepts the first syntax of the *acceptor's* list that the requestor proposed, which is
    Implicit VR Little Endian whenever offered. The grid never transcodes, so that choice would make
    senders convert their native encoding before a C-STORE, and would give a C-GET requestor that
    proposes one context per SOP class (DCMTK getscu) only the implicit-VR instances. Following the
    requestor's order keeps every instance in the encoding its sender chose.
    """
    preference: dict[str, list[str]] = {}
    for proposed in event.assoc.requestor.primitive.presentation_context_definition_list:
        preference.setdefault(proposed.abstract_syntax, []).extend(proposed.transfer_syntax)
    contexts = event.assoc.acceptor.supported_contexts
    for context in contexts:
        order = preference.get(context.abstract_syntax)
        if order:
            rank: dict[str, int] = {}
            for position, ts in enumerate(order):
                rank.setdefault(ts, position)
            context.transfer_syntax = sorted(context.transfer_syntax, key=lambda ts: rank.get(ts, len(order)))
    event.assoc.acceptor.supported_contexts = contexts


def peer_of(event: evt.Event) -> tuple[str | None, str]:
    """(calling AE title, "host:port") of the association's requestor."""
    requestor = event.assoc.requestor
    return (requestor.ae_title or None), f"{requestor.address}:{requestor.port}"


class SiteAE:
    """The DICOM face of one site: Verification plus every service given."""

    def __init__(self, config: GridConfig, site: str, services: Sequence[DimseService], audit: AuditTrail) -> None:
        self.config = config
        self.site = config.site(site)
        self.services = list(services)
        self.audit = audit
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.site.ae_title)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for service in self.services:
            for cx in service.contexts():
                ae.add_supported_context(cx.abstract_syntax, list(cx.transfer_syntaxes), cx.scu_role, cx.scp_role)
        ae.require_called_aet = True
        security = self.config.security
        if not (security.allow_any_calling_ae and not security.allowed_calling_aes):
            ae.require_calling_aet = list(security.allowed_calling_aes)
        return ae

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        out: list[tuple[Any, Callable[..., Any]]] = [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_REQUESTED, prefer_requested_syntaxes),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        for service in self.services:
            out.extend(service.handlers())
        return out

    def _on_rejected(self, event: evt.Event) -> None:
        calling_ae, peer = peer_of(event)
        self.audit.record(
            "E",
            "Security Alert",
            MINOR_FAILURE,
            f"association rejected: calling AE {calling_ae!r} not allowed or called AE wrong",
            [Participant(calling_ae or "unknown", True, calling_ae, peer, "Requestor")],
        )

    def serve(self, *, spool_dir: Any, reuse_port: bool = False, block: bool = True) -> ThreadedAssociationServer:
        """Listen on the site's DICOM address; blocks unless ``block`` is false.

        ``spool_dir`` receives the data sets pynetdicom streams to temporary files: keep it on the site's
        volume. Both settings are process-wide in pynetdicom, so they are made here, by the process that
        serves, rather than on import.
        """
        # Received data sets are streamed to a file, and C-GET/C-MOVE sub-operations send stored files
        # from disk a PDU at a time: memory stays flat for 1 GB instances either way.
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.STORE_SEND_CHUNKED_DATASET = True
        tempfile.tempdir = str(spool_dir)
        server = self.ae.make_server(
            (self.site.dicom_host, self.site.dicom_port),
            contexts=[_CheapCopyContext.of(cx) for cx in self.ae.supported_contexts],
            evt_handlers=self.handlers(),
            server_class=_ReusePortServer if reuse_port else ThreadedAssociationServer,
        )
        self.ae._servers.append(server)
        log.info(
            "dicom services listening",
            site=self.site.name,
            ae_title=self.site.ae_title,
            address=f"{self.site.dicom_host}:{self.site.dicom_port}",
            services=[type(s).__name__ for s in self.services],
        )
        if block:
            try:
                server.serve_forever()
            finally:
                server.shutdown()
        else:
            threading.Thread(target=server.serve_forever, name=f"dimse-{self.site.name}", daemon=True).start()
        return server
