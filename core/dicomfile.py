"""Reading just enough of a DICOM file to index it, and the grid's canonical file meta.

Every payload in a blob store is ``preamble + DICM + canonical file meta + the data set exactly as
received``. The file meta (group 0002) is rebuilt by the grid from the SOP Class, SOP Instance and
Transfer Syntax UIDs only, so the same data set yields the same bytes, and hence the same digest,
whether it arrived by C-STORE, STOW-RS or replication, and whichever AE sent it.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag

# The grid's implementation identity in file meta (a UUID-derived UID under the 2.25 root).
IMPLEMENTATION_CLASS_UID = "2.25.40947379571910522469075162332634843739"
IMPLEMENTATION_VERSION_NAME = "DICOMGRID_1"

MAX_TEXT = 1024  # index copies of text attributes are clipped; the payload keeps the original

# What the index, C-FIND and QIDO-RS need. Everything else stays in the payload, unparsed.
INDEX_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate", "SeriesTime",
    "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
)


class MalformedDicom(ValueError):
    """The bytes are not a readable DICOM data set."""


def canonical_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` prefix and the grid's file meta group for one instance."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


def split_file_meta(fp: BinaryIO) -> tuple[Dataset, int]:
    """Read a Part 10 file's meta group; return it and the offset where the data set begins."""

    def past_group_2(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag.group != 2

    fp.seek(0)
    try:
        read_preamble(fp, False)
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=past_group_2)
    except (InvalidDicomError, EOFError, ValueError, OSError, struct.error) as exc:
        raise MalformedDicom(f"unreadable file meta: {exc}") from exc
    return meta, fp.tell()


@dataclass(frozen=True)
class IndexAttributes:
    """The attributes an instance is indexed by, decoded to text (character set applied)."""

    values: dict[str, Any]

    def get(self, keyword: str) -> Any:
        return self.values.get(keyword)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00")
    return text[:MAX_TEXT] if text else None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


_INT_KEYWORDS = {"SeriesNumber", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"}


def read_index_attributes(fp: BinaryIO) -> IndexAttributes:
    """Parse only the indexed attributes of a Part 10 file; pixel data is never read.

    Raises :class:`MalformedDicom` when the data set cannot be decoded.
    """
    fp.seek(0)
    try:
        ds = dcmread(fp, stop_before_pixels=True, specific_tags=list(INDEX_KEYWORDS), force=False)
        values: dict[str, Any] = {}
        for keyword in INDEX_KEYWORDS:
            raw = ds.get(keyword)
            if keyword in _INT_KEYWORDS:
                values[keyword] = _int(raw)
            elif keyword == "SpecificCharacterSet":
                values[keyword] = _text("\\".join(raw) if isinstance(raw, MultiValue) else raw)
            else:
                values[keyword] = _text(raw)
    except MalformedDicom:
        raise
    except Exception as exc:  # pydicom raises many types on hostile input; all mean "cannot decode"
        raise MalformedDicom(f"cannot decode data set: {type(exc).__name__}: {exc}") from exc
    return IndexAttributes(values)
