"""The audit of what an association (or a STOW-RS request) stored: one record for all of it
(:mod:`dicomgrid.core.transfer_audit`), the sender as Source and the receiving site as Destination."""

from __future__ import annotations

from dicomgrid.core.audit import AuditTrail, Participant
from dicomgrid.core.events import Source
from dicomgrid.core.transfer_audit import TransferAudit


def store_participants(site: str, source: Source) -> list[Participant]:
    """The sender (requestor) and the receiving site of a store."""
    return [
        Participant(source.calling_ae or "unknown", True, source.calling_ae, source.peer_address, "Source"),
        Participant(site, False, source.called_ae, None, "Destination"),
    ]


class StoreAudit(TransferAudit):
    """The successful stores of one association or request, audited together."""

    def __init__(self, trail: AuditTrail, site: str, source: Source) -> None:
        super().__init__(trail, store_participants(site, source), f"{source.protocol} stored")
