"""The de-identifier: PS3.15 Annex E applied to a pydicom data set, with keyed pseudonyms.

Every element, at the top level and in every sequence item, is handled by its Table E.1-1 action under
the trial's profile (:mod:`dicomgrid.trials.profile`):

==========  =========================================================================================
X           removed (a sequence with all its items)
Z           emptied; Patient's Name becomes the patient's pseudonym rather than empty
D           replaced by a dummy of its VR: keyed pseudonyms for UIDs and text (consistent for the same
            original), fixed dummies for dates, times and numbers; Patient ID becomes the patient's
            pseudonym
U           UIDs replaced by keyed ``2.25.`` pseudonyms, so references stay consistent
K           kept; a sequence is kept and its items de-identified in turn
C           cleaned: dates shifted by the patient's offset (Modified Dates), descriptors rid of the data
            set's identifying values (Clean Descriptors), safe private attributes kept (Retain Safe Private),
            sequences de-identified item by item
compound    "X unless Z or D is required for IOD conformance": this engine has no IOD tables, so it takes
            the alternative that keeps any IOD conformant: X/Z -> Z, X/D, Z/D and X/Z/D -> D, X/Z/U* -> U
==========  =========================================================================================

Elements the table does not list are kept, except, as E.1.1 advises for attributes newer than the
table: person names (emptied), dates and date-times (handled like a listed date: shifted, kept with
Full Dates, otherwise a dummy) and UIDs that are not well-known UIDs of the standard (replaced). Groups
0000, 0002 and 0004 are removed. Private attributes are removed, unless Retain Safe Private keeps those
Table E.3.10-1 lists (with their Private Creator). Pixel data is never touched.

Patient Identity Removed, De-identification Method (Code Sequence) and Longitudinal Temporal Information
Modified are set as E.1.1, E.2 and E.3.6 require.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom._uid_dict import UID_dictionary
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from dicomgrid.core.dicomfile import canonical_file_meta
from dicomgrid.trials.profile import Profile, safe_private, table_source
from dicomgrid.trials.pseudonyms import Pseudonyms

PATIENT_ID, PATIENT_NAME = Tag(0x0010, 0x0020), Tag(0x0010, 0x0010)
_RESOLVE = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
_MAX_CHARS = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "UC": 64, "ST": 1024, "LT": 10240, "UT": 10240}
_TEXT_VRS = frozenset(_MAX_CHARS) - {"CS"}
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_BYTES_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "DS": "0", "IS": "0", "AS": "000D",
          "CS": "REMOVED", "UR": "urn:x-dicomgrid:removed"}
# Values of these attributes (and of every person name) are what Clean Descriptors removes from text.
_IDENTITY_KEYWORDS = (
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "StationName", "DeviceSerialNumber", "RequestingService", "MilitaryRank", "BranchOfService",
    "RegionOfResidence", "CountryOfResidence",
)
_MIN_TOKEN = 3
REDACTED = "***"
# Instances of these classes routinely show identity in their pixels: burned-in demographics
# (ultrasound, secondary capture, video), faces or skin (photographs), labels (slide scans), documents.
_IDENTIFYING_CLASSES = re.compile(
    r"^(SecondaryCapture|MultiFrame\w*SecondaryCapture|Ultrasound\w*|\w*Photograph\w*|VL\w+|Video\w+|"
    r"Encapsulated\w+)(Image)?Storage\w*$"
)


class WithheldInstance(Exception):
    """An instance that may show identity in its pixel data, which a trial without ``allow_burned_in`` withholds."""


def identifying_pixels(ds: Dataset) -> str | None:
    """Why an instance may carry identity in its pixels (None if nothing says so)."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "Burned In Annotation is YES"
    if str(ds.get("RecognizableVisualFeatures", "")).strip().upper() == "YES":
        return "Recognizable Visual Features is YES"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class and identifying_class(sop_class):
        return f"SOP class {UID(sop_class).name} may show identity in its pixels"
    return None


def identifying_class(sop_class_uid: str) -> bool:
    entry = UID_dictionary.get(sop_class_uid)
    return bool(entry and _IDENTIFYING_CLASSES.match(entry[4]))


def _well_known(uid: str) -> bool:
    return uid in UID_dictionary


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]


@dataclass
class _Context:
    """What one data set's de-identification needs to know about its original."""

    patient_pseudonym: str
    day_shift: int
    redact: re.Pattern[str] | None
    kept_private: set[tuple[int, int]] = field(default_factory=set)


class Deidentifier:
    """Applies one trial's profile under its key. Thread-safe: it keeps no per-data-set state."""

    def __init__(self, profile: Profile, pseudonyms: Pseudonyms, method: str) -> None:
        self.profile = profile
        self.pseudonyms = pseudonyms
        self.method = method[:64]
        self._safe_private = safe_private() if profile.has("retain-safe-private") else frozenset()

    # -- the data set -------------------------------------------------------------------------------

    def patient_key(self, patient_id: str | None, study_uid: str | None) -> str:
        """Whose dates move together: the patient, or (without a Patient ID) only the study."""
        return patient_id.strip() if patient_id and patient_id.strip() else f"study:{study_uid or ''}"

    def deidentify(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (and return it); its file meta is dropped."""
        patient_id = str(ds.get("PatientID", "") or "")
        patient = self.patient_key(patient_id, str(ds.get("StudyInstanceUID", "") or ""))
        context = _Context(
            patient_pseudonym=self.pseudonyms.patient_id(patient),
            day_shift=self.pseudonyms.day_shift(patient),
            redact=_redaction(ds) if self.profile.has("clean-descriptors") else None,
        )
        self._dataset(ds, context)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self.method
        codes = []
        for value, meaning in self.profile.codes():
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = codes
        ds.LongitudinalTemporalInformationModified = self.profile.temporal
        if hasattr(ds, "file_meta"):
            del ds.file_meta
        return ds

    def _dataset(self, ds: Dataset, context: _Context) -> None:
        creators: list[BaseTag] = []
        for tag in list(ds.keys()):
            try:
                elem = ds[tag]
            except Exception:  # a value pydicom cannot decode is not known to be safe
                del ds[tag]
                continue
            if tag.group in (0x0000, 0x0002, 0x0004):
                del ds[tag]
            elif tag.is_private:
                if tag.is_private_creator:
                    creators.append(tag)
                else:
                    self._private(ds, elem, context)
            else:
                self._element(ds, elem, context)
        for tag in creators:
            if not any(group == tag.group and block == tag.element for group, block in context.kept_private):
                del ds[tag]

    def _private(self, ds: Dataset, elem: DataElement, context: _Context) -> None:
        tag = elem.tag
        block = tag.element >> 8
        creator = ds.get(Tag(tag.group, block))
        name = str(creator.value).strip() if creator is not None and creator.value else ""
        if (tag.group, name, tag.element & 0xFF) in self._safe_private:
            context.kept_private.add((tag.group, block))
        elif self._safe_private and elem.VR == "SQ":
            # E.3.10: a private sequence not known to be safe is parsed and its contents judged one by one.
            for item in elem.value:
                self._dataset(item, context)
            context.kept_private.add((tag.group, block))
        else:
            del ds[tag]

    def _element(self, ds: Dataset, elem: DataElement, context: _Context) -> None:
        action = self.profile.action_for(elem.tag)
        if action is None:
            action = self._unlisted(elem)
        action = _RESOLVE.get(action, action)
        tag, vr = elem.tag, elem.VR
        if action == "X":
            del ds[tag]
        elif vr == "SQ":
            if action == "Z":
                elem.value = Sequence()
            else:  # K, C, D, U: the sequence stays and each item is de-identified in turn
                for item in elem.value:
                    self._dataset(item, context)
        elif action == "Z":
            elem.value = context.patient_pseudonym if tag == PATIENT_NAME else None
        elif action == "D":
            self._dummy(elem, context)
        elif action == "U":
            self._uids(elem)
        elif action == "C":
            self._clean(ds, elem, context)
        # K: kept as it is

    def _unlisted(self, elem: DataElement) -> str:
        vr = elem.VR
        if vr == "PN":
            return "Z"
        if vr in ("DA", "DT"):
            if self.profile.has("retain-longitudinal-modified-dates"):
                return "C"
            return "K" if self.profile.has("retain-longitudinal-full-dates") else "D"
        if vr == "UI" and not all(_well_known(str(v)) for v in _values(elem.value)):
            return "U"
        return "K"

    # -- replacement values -------------------------------------------------------------------------

    def _dummy(self, elem: DataElement, context: _Context) -> None:
        vr, originals = elem.VR, _values(elem.value)
        if elem.tag == PATIENT_ID:
            elem.value = self.pseudonyms.patient_id(str(elem.value).strip()) if originals else context.patient_pseudonym
        elif vr == "UI":
            elem.value = [self.pseudonyms.uid(str(v)) for v in originals] or self.pseudonyms.uid("")
            _single(elem)
        elif vr in _TEXT_VRS:
            limit = _MAX_CHARS[vr]
            elem.value = [self.pseudonyms.text(str(v), limit) for v in originals] or self.pseudonyms.text("", limit)
            _single(elem)
        elif vr in _DUMMY:
            elem.value = _DUMMY[vr]
        elif vr in _NUMBER_VRS:
            elem.value = 0
        elif vr in _BYTES_VRS:
            elem.value = b"\x00\x00"
        else:
            elem.value = None

    def _uids(self, elem: DataElement) -> None:
        if elem.VR != "UI":
            elem.value = None
            return
        elem.value = [self.pseudonyms.uid(str(v)) for v in _values(elem.value)] or None
        _single(elem)

    def _clean(self, ds: Dataset, elem: DataElement, context: _Context) -> None:
        vr = elem.VR
        if vr in ("DA", "DT"):
            if self.profile.has("retain-longitudinal-modified-dates"):
                elem.value = self._shifted(elem, context.day_shift)
        elif vr in _TEXT_VRS and context.redact is not None:
            elem.value = [context.redact.sub(REDACTED, str(v)) for v in _values(elem.value)] or None
            _single(elem)
        elif vr in _TEXT_VRS or vr == "CS":
            # Cleaning is only defined here for descriptors, under Clean Descriptors; without it the
            # attribute is one the selected options keep (Retain Device/Institution Identity).
            pass
        # Times stay: dates move by whole days, so times of day and intervals stay right (E.3.6).

    def _shifted(self, elem: DataElement, days: int) -> Any:
        out = []
        for value in _values(elem.value):
            text = str(value).strip()
            moved = self.pseudonyms.shift_date(text[:8], days)
            if moved is None:
                continue  # a partial or malformed date cannot be moved: it does not stay either
            out.append(moved + (text[8:] if elem.VR == "DT" else ""))
        return out[0] if len(out) == 1 else (out or None)

    # -- files --------------------------------------------------------------------------------------

    def deidentify_file(self, source: str | BinaryIO, out: BinaryIO) -> Dataset:
        """Read a stored Part 10 file and write its de-identified copy (same transfer syntax, the grid's file
        meta) to ``out``; returns the de-identified data set (pixel data included)."""
        ds = dcmread(source)
        transfer_syntax = ds.file_meta.TransferSyntaxUID
        self.deidentify(ds)
        buffer = DicomBytesIO()
        buffer.is_little_endian = transfer_syntax.is_little_endian
        buffer.is_implicit_VR = transfer_syntax.is_implicit_VR
        write_dataset(buffer, ds)
        body = buffer.getvalue()
        if transfer_syntax.is_deflated:
            packer = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = packer.compress(body) + packer.flush()
        out.write(canonical_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(transfer_syntax)))
        out.write(body)
        return ds

    def deidentify_bytes(self, source: str | BinaryIO) -> bytes:
        out = io.BytesIO()
        self.deidentify_file(source, out)
        return out.getvalue()


def method_description(trial: str) -> str:
    source = table_source()["document"].removeprefix("DICOM ").split(" - ")[0]
    return f"dicomgrid trial {trial}: {source} Annex E, keyed"[:64]


def _single(elem: DataElement) -> None:
    if isinstance(elem.value, list) and len(elem.value) == 1:
        elem.value = elem.value[0]


def _identity_values(ds: Dataset) -> Iterable[str]:
    for elem in ds.iterall():
        try:
            if elem.VR == "PN" or elem.keyword in _IDENTITY_KEYWORDS:
                for value in _values(elem.value):
                    yield str(value)
        except Exception:
            continue


def _redaction(ds: Dataset) -> re.Pattern[str] | None:
    """A pattern matching this data set's identifying values (whole values and name components)."""
    tokens: set[str] = set()
    for value in _identity_values(ds):
        value = value.strip()
        if len(value) >= _MIN_TOKEN:
            tokens.add(value)
        tokens.update(part for part in re.split(r"[\^=\s,]+", value) if len(part) >= _MIN_TOKEN)
    if not tokens:
        return None
    alternatives = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in alternatives), re.IGNORECASE)
