"""A trial on a site's DICOM port: C-FIND, C-GET and C-MOVE under the trial's own called AE title.

:class:`TrialAETitles` is what :class:`~dicomgrid.core.dimse.SiteAE` asks about called AE titles other
than the site's. An association calling a trial's AE title gets the trial's services only: queries see its
members, de-identified; retrieves send de-identified copies (the stored file is never sent); C-STORE and
Storage Commitment are refused, as nothing may be written through a trial.

Withheld instances (pixels that may show identity) are not sent. They are counted as failed
sub-operations, listed by their pseudonymous SOP Instance UID in the Failed SOP Instance UID List, and the
final response says why in its Error Comment (0xB000 when others were sent, 0xA702 when none was).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt

from dicomgrid.consumers.find_scp import FindService, failure
from dicomgrid.consumers.payloads import Payloads
from dicomgrid.consumers.query import SiteAnswers
from dicomgrid.consumers.retrieve_scp import (
    CANCEL,
    PENDING,
    InvalidIdentifier,
    RetrieveService,
    _SubOperation,
    _Transfer,
    parse_identifier,
)
from dicomgrid.core.audit import AUDIT_MAX_INSTANCES, MINOR_FAILURE, SERIOUS_FAILURE, SUCCESS, AuditObject, Participant
from dicomgrid.core.dimse import Context
from dicomgrid.core.index_reader import StoredInstance
from dicomgrid.core.logging import get_logger
from dicomgrid.core.site import SiteContext
from dicomgrid.trials.access import Release, TrialAccess
from dicomgrid.trials.store import Trial, TrialDirectory, TrialStore

log = get_logger(__name__)

NOT_AUTHORIZED = 0x0124
CANNOT_UNDERSTAND = 0xC000
ALL_FAILED, SOME_FAILED = 0xA702, 0xB000


def trial_participant(trial: Trial) -> Participant:
    """The trial as the destination of what it is sent (audit records)."""
    return Participant(f"trial {trial.name}", False, trial.ae_title, None, "Destination")


def release_objects(access: TrialAccess, release: Release, sent: list[StoredInstance]) -> list[AuditObject]:
    """Audit objects of a de-identified release: the trial, each original patient (the audit trail is the
    one place the original is named next to its pseudonym), each study and each instance sent."""
    objects = [AuditObject("trial", access.trial.name, {"ae_title": access.trial.ae_title})]
    for patient_id, name in dict.fromkeys(release.patients.values()):
        if patient_id:
            objects.append(AuditObject("patient", patient_id, {"name": name, "pseudonym": access.pseudonyms.patient_id(patient_id)}))
    per_study: dict[str, int] = {}
    for item in sent:
        per_study[item.study_uid] = per_study.get(item.study_uid, 0) + 1
    for study, count in per_study.items():
        objects.append(AuditObject("study", study, {"instances": count, "pseudonym": access.pseudonyms.uid(study)}))
    for item in sent[:AUDIT_MAX_INSTANCES]:
        objects.append(AuditObject("instance", item.sop_instance_uid, {
            "sop_class_uid": item.sop_class_uid, "study_uid": item.study_uid,
            "pseudonym": access.pseudonyms.uid(item.sop_instance_uid)}))
    return objects


class _Deidentified(_SubOperation):
    """A C-STORE sub-operation sending a de-identified copy of the stored instance, under its pseudonyms."""

    def __init__(self, instance: StoredInstance, move_originator: str | None, access: TrialAccess) -> None:
        super().__init__(instance, move_originator)
        self.SOPInstanceUID = access.pseudonyms.uid(instance.sop_instance_uid)
        self._access = access

    def send(self, send_c_store: Callable[..., Dataset], payloads: Payloads, *args: Any, **kwargs: Any) -> Dataset:
        path = payloads.local_path(self._instance)
        if self._move_originator:
            kwargs["originator_aet"] = self._move_originator
        # The spool (tempfile.tempdir) is the site's volume; the copy lives only while it is sent.
        with tempfile.NamedTemporaryFile(suffix=".dcm") as copy:
            try:
                self._access.deidentifier.deidentify_file(str(path), copy)
                copy.flush()
            except Exception as exc:  # a stored file pydicom cannot rewrite is not sent at all
                log.error("instance not de-identified", trial=self._access.trial.name, sha256=self._instance.sha256,
                          error=type(exc).__name__)
                status = Dataset()
                status.Status = CANNOT_UNDERSTAND
                return status
            status = send_c_store(copy.name, *args, **kwargs)
        code = status.get("Status")
        self._outcome = "completed" if code == 0 else "warning" if code in (0xB000, 0xB006, 0xB007) else "failed"
        return status


class _TrialTransfer(_Transfer):
    """A trial retrieve: begun and ended like any transfer, and recorded as an Export to the trial."""

    access: TrialAccess | None = None
    release: Release | None = None
    sent: list[StoredInstance] | None = None

    def finish(self, how: str) -> None:
        # One end record for a trial retrieve: the Export, in place of DICOM Instances Transferred.
        if self.finished:
            return
        self.finished = True
        assert self.access is not None and self.release is not None
        sent = self.sent or []
        withheld = len(self.release.withheld)
        done = self.tally["completed"] + self.tally["warning"]
        log.info("trial retrieve finished", trial=self.access.trial.name, operation=self.operation, how=how,
                 seconds=round(time.monotonic() - self.started, 3), withheld=withheld, **self.tally)
        outcome = SUCCESS if how == "completed" and not self.tally["failed"] else (
            SERIOUS_FAILURE if not done else MINOR_FAILURE)
        self.service.site.audit.record(
            "R", "Export", outcome,
            f"{self.operation} {how}: {done} de-identified instance(s) released to trial {self.access.trial.name}, "
            f"{self.tally['failed']} failed, {withheld} withheld (pixel data may show identity)",
            self.participants, release_objects(self.access, self.release, sent),
        )


class _Planned(list):  # type: ignore[type-arg]
    """The instances of one trial retrieve (released ones), with what else the request named."""

    access: TrialAccess
    release: Release


class TrialFindService(FindService):
    def __init__(self, site: SiteContext, directory: TrialDirectory, store: TrialStore, payloads: Payloads) -> None:
        super().__init__(site)
        self.directory = directory
        self.store = store
        self.payloads = payloads

    def _trial(self, event: evt.Event) -> Trial | None:
        return self.directory.by_ae(event.assoc.acceptor.ae_title)

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        if self._trial(event) is None:
            yield failure(0xC001, "this trial is no longer served"), None
            return
        yield from super().on_find(event)

    def _engine(self, event: evt.Event, cancelled: Callable[[], bool]) -> TrialAccess:
        trial = self._trial(event)
        assert trial is not None
        return TrialAccess(self.site, self.store, trial, self.payloads, cancelled)

    def _answers(self, event: evt.Event) -> SiteAnswers:
        trial = self._trial(event)
        assert trial is not None
        me = self.site.site
        return SiteAnswers(trial.ae_title, f"http://{me.http_host}:{me.http_port}/trials/{trial.name}/dicomweb")

    def _destination(self, event: evt.Event) -> Participant:
        trial = self._trial(event)
        return trial_participant(trial) if trial else super()._destination(event)


class TrialRetrieveService(RetrieveService):
    def __init__(self, site: SiteContext, directory: TrialDirectory, store: TrialStore, payloads: Payloads) -> None:
        super().__init__(site, payloads)
        self.directory = directory
        self.store = store

    def _match(self, event: evt.Event) -> list[StoredInstance]:
        trial = self.directory.by_ae(event.assoc.acceptor.ae_title)
        if trial is None:
            raise InvalidIdentifier("this trial is no longer served")
        try:
            identifier = event.identifier
        except Exception as exc:
            raise InvalidIdentifier(f"identifier cannot be decoded: {type(exc).__name__}") from exc
        request = parse_identifier(identifier, event.context.abstract_syntax)
        access = TrialAccess(self.site, self.store, trial, self.payloads)
        release = access.resolve(request.level, request.patient_id, request.study_uids, request.series_uids,
                                 request.sop_instance_uids)
        planned = _Planned(release.released + [item for item, _ in release.withheld])
        planned.access, planned.release = access, release
        return planned

    def _transfer(self, operation: str, participants: list[Participant], instances: list[StoredInstance],
                  move_originator: str | None = None) -> _Transfer:
        assert isinstance(instances, _Planned)
        transfer = _TrialTransfer(self, operation, [*participants, trial_participant(instances.access.trial)],
                                  list(instances.release.released), move_originator)
        transfer.access, transfer.release = instances.access, instances.release
        return transfer

    def _each_sub_operation(self, event: evt.Event, transfer: _Transfer) -> Iterator[Any]:
        assert isinstance(transfer, _TrialTransfer) and transfer.access is not None and transfer.release is not None
        failed: list[str] = []
        transfer.sent = []
        for item in transfer.instances:
            if event.is_cancelled:
                transfer.finish("cancelled")
                yield CANCEL, None
                return
            sub = _Deidentified(item, transfer.move_originator, transfer.access)
            yield PENDING, sub
            transfer.tally[sub.outcome] += 1
            if sub.outcome == "failed":
                failed.append(sub.SOPInstanceUID)
            else:
                transfer.sent.append(item)
        transfer.finish("completed")
        withheld = transfer.release.withheld
        if withheld:
            # The remaining sub-operations (the withheld ones) count as failed; the comment says why.
            status = Dataset()
            status.Status = ALL_FAILED if not (transfer.tally["completed"] + transfer.tally["warning"]) else SOME_FAILED
            reasons = sorted({reason for _, reason in withheld})
            status.NumberOfRemainingSuboperations = None  # final: pynetdicom would repeat the last pending count
            status.ErrorComment = f"{len(withheld)} withheld: {'; '.join(reasons)}"[:64].replace("\\", "/")
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = failed + [transfer.access.pseudonyms.uid(i.sop_instance_uid)
                                                            for i, _ in withheld]
            yield status, identifier


def refuse_store(event: evt.Event) -> int:
    log.warning("c-store refused on a trial AE title", called_ae=event.assoc.acceptor.ae_title)
    return NOT_AUTHORIZED


def refuse_action(event: evt.Event) -> tuple[int, None]:
    log.warning("n-action refused on a trial AE title", called_ae=event.assoc.acceptor.ae_title)
    return NOT_AUTHORIZED, None


class TrialAETitles:
    """Every trial's called AE title on a site's port (:class:`~dicomgrid.core.dimse.CalledAETitles`)."""

    def __init__(self, site: SiteContext, payloads: Payloads | None = None) -> None:
        self.store = TrialStore(site.db, site.config)
        self.directory = TrialDirectory(self.store)
        payloads = payloads or Payloads(site)
        self.find = TrialFindService(site, self.directory, self.store, payloads)
        self.retrieve = TrialRetrieveService(site, self.directory, self.store, payloads)

    def serves(self, called_ae_title: str) -> bool:
        try:
            return self.directory.by_ae(called_ae_title) is not None
        except Exception:  # the trial store unreachable: the association is rejected as for an unknown title
            log.exception("trial look-up failed")
            return False

    def handler(self, event_type: Any) -> Callable[..., Any] | None:
        return {
            evt.EVT_C_FIND: self.find.on_find,
            evt.EVT_C_GET: self.retrieve.on_get,
            evt.EVT_C_MOVE: self.retrieve.on_move,
            evt.EVT_C_STORE: refuse_store,
            evt.EVT_N_ACTION: refuse_action,
        }.get(event_type)

    def contexts(self) -> list[Context]:
        return []
