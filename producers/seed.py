"""Pushing files to a site with C-STORE, as a PACS would: used to seed a new grid with sample studies."""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.service_class import StorageServiceClass
from tqdm import tqdm

from dicomgrid.core.config import SiteConfig
from dicomgrid.core.dicomfile import MalformedDicom, check_complete, read_index_attributes, split_file_meta
from dicomgrid.core.uids import is_valid_uid
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

CALLING_AE = "STORESCU"
MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


@dataclass
class SendReport:
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs answered 0x0000

    def render(self, list_skipped: bool = False) -> str:
        lines = [f"sent {self.sent} instance(s): " + ", ".join(f"{k} x{v}" for k, v in sorted(self.statuses.items()))]
        lines += [f"  refused {p}: {why}" for p, why in self.failed]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} file(s) that are not storable instances")
            if list_skipped:
                lines += [f"    {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "statuses": dict(sorted(self.statuses.items())),
            "failed": [{"file": str(p), "reason": why} for p, why in self.failed],
            "skipped": [{"file": str(p), "reason": why} for p, why in self.skipped],
        }


def _storable(path: Path) -> tuple[str, str] | str:
    """(SOP Class UID, Transfer Syntax UID) of a Part 10 file, or the reason it cannot be sent."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        sop_class = str(ds.file_meta.MediaStorageSOPClassUID)
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:  # unreadable, no file meta
        return f"unreadable: {type(exc).__name__}"
    if uid_to_service_class(sop_class) is not StorageServiceClass:
        return f"not a storage SOP class ({sop_class})"
    return sop_class, transfer_syntax


def _well_formed(path: Path) -> bool:
    """True for files a conforming archive accepts: valid UIDs, consistent file meta, complete data set."""
    try:
        with path.open("rb") as fp:
            meta, offset = split_file_meta(fp)
            check_complete(fp, offset, str(meta.get("TransferSyntaxUID", "")))
            attrs = read_index_attributes(fp)
    except MalformedDicom:
        return False
    uids = [attrs.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
    return all(is_valid_uid(u) for u in uids) and attrs.get("SOPInstanceUID") == meta.get("MediaStorageSOPInstanceUID")


def _sop_instance_uid(path: Path) -> str:
    meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).file_meta
    return str(meta.MediaStorageSOPInstanceUID)


def sample_files() -> list[Path]:
    """pydicom's bundled test files that are well-formed storable instances: a varied set of studies.

    The set holds several files with the same SOP Instance UID and different content: the grid keeps
    those as versions of one instance.
    """
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(p for p in folder.rglob("*.dcm") if isinstance(_storable(p), tuple) and _well_formed(p))


def send_files(site: SiteConfig, files: list[Path], calling_ae: str = CALLING_AE, progress: bool = True,
               tls: ssl.SSLContext | None = None) -> SendReport:
    """C-STORE every file to ``site`` (to its TLS port with ``tls``); one association per batch of up to
    128 presentation contexts."""
    port = site.dicom_tls_port if tls is not None else site.dicom_port
    tls_args = (tls, site.dicom_host) if tls is not None else None
    # Send each file's data set bytes as they are on disk, never decoded and re-encoded.
    _config.STORE_SEND_CHUNKED_DATASET = True
    report = SendReport()
    plan: dict[tuple[str, str], list[Path]] = {}
    for path in files:
        kind = _storable(path)
        if isinstance(kind, str):
            report.skipped.append((path, kind))
        else:
            plan.setdefault(kind, []).append(path)
    keys = list(plan)
    with tqdm(total=sum(len(v) for v in plan.values()), unit="inst", desc=f"C-STORE to {site.ae_title}",
              disable=not progress) as bar:
        for start in range(0, len(keys), MAX_CONTEXTS):
            batch = keys[start : start + MAX_CONTEXTS]
            ae = AE(ae_title=calling_ae)
            ae.requested_contexts = [build_context(sop, ts) for sop, ts in batch]
            assoc = ae.associate(site.dicom_host, port, ae_title=site.ae_title, tls_args=tls_args)
            if not assoc.is_established:
                raise ConnectionError(f"association with {site.ae_title} at {site.dicom_host}:{port} failed")
            try:
                for key in batch:
                    for path in plan[key]:
                        status = assoc.send_c_store(path)
                        code = getattr(status, "Status", None)
                        report.sent += 1
                        report.statuses["0x%04X" % code if code is not None else "no response"] += 1
                        if code == 0x0000:
                            report.stored.append(_sop_instance_uid(path))
                        else:
                            comment = getattr(status, "ErrorComment", "") if status else "no response"
                            report.failed.append((path, f"0x{code:04X} {comment}" if code is not None else comment))
                        bar.update()
            finally:
                assoc.release()
    return report
