"""`dicomgrid export study`: one study's instances written to a folder as DICOM Part 10 files.

The bytes come from :class:`~dicomgrid.consumers.payloads.Payloads`, as every retrieve's do: verified,
and fetched from another site when the local copy is missing or corrupt. Files are written under a
temporary name and renamed once complete, so the folder never holds a partial instance; the export is
audited (DICOM "Export", naming the patient, the study and its instances).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dicomgrid.consumers.payloads import Payloads
from dicomgrid.core.audit import MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, Participant, audited_patients, transfer_objects
from dicomgrid.core.blobstore import PayloadCorrupt
from dicomgrid.core.index_reader import StoredInstance
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.core.transfer import PayloadUnavailable

log = get_logger(__name__)


@dataclass
class ExportReport:
    study_uid: str
    directory: str
    written: int = 0
    bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, why)

    @property
    def ok(self) -> bool:
        return self.written > 0 and not self.failed

    def as_dict(self) -> dict[str, object]:
        return {"study_uid": self.study_uid, "directory": self.directory, "written": self.written,
                "bytes": self.bytes, "failed": [{"sop_instance_uid": u, "reason": r} for u, r in self.failed]}

    def render(self) -> str:
        lines = [f"{self.written} instance(s), {self.bytes / 1e6:.2f} MB written to {self.directory}"]
        lines += [f"  not exported {uid}: {why}" for uid, why in self.failed]
        return "\n".join(lines)


def instance_path(directory: Path, item: StoredInstance) -> Path:
    return directory / item.study_uid / item.series_uid / f"{item.sop_instance_uid}.dcm"


def export_study(
    site: SiteContext, study_uid: str, directory: Path, on_progress: Callable[[int], object] = lambda n: None
) -> ExportReport:
    """Write the newest version of each instance of ``study_uid`` under ``directory/<study>/<series>/``."""
    instances = site.index.find_instances(study_uid)
    report = ExportReport(study_uid, str(directory.resolve()))
    if not instances:
        report.failed.append(("-", "study not in the index"))
        return report
    payloads = Payloads(site)
    written: list[StoredInstance] = []
    for item in instances:
        target = instance_path(directory, item)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".dcm.partial")
        try:
            with payloads.open(item) as reader, partial.open("wb") as out:
                for chunk in reader:  # verified as it is read when it was not before
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, target)
        except (PayloadUnavailable, PayloadCorrupt, OSError) as exc:
            partial.unlink(missing_ok=True)
            report.failed.append((item.sop_instance_uid, str(exc)[:200]))
            log.warning("instance not exported", reason=str(exc)[:200])
        else:
            written.append(item)
            report.written += 1
            report.bytes += target.stat().st_size
        on_progress(1)
    _audit(site, report, written, instances)
    return report


def _audit(site: SiteContext, report: ExportReport, written: list[StoredInstance],
           instances: list[StoredInstance]) -> None:
    me = site.site
    outcome = SUCCESS if report.ok else (MINOR_FAILURE if written else SERIOUS_FAILURE)
    site.audit.record(
        "R", "Export", outcome,
        f"study exported to a folder: {report.written} of {len(instances)} instance(s) written",
        [Participant(getpass.getuser(), True, None, None, "Source"),
         Participant(me.name, False, me.ae_title, None, "Source"),
         Participant(report.directory, False, None, None, "Destination Media")],
        transfer_objects(written, audited_patients(site, written)),
    )
