"""The grid's file meta encoding and its partial parse of received data sets."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from dicomgrid.core import dicomfile


def _pydicom_meta(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = dicomfile.IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = dicomfile.IMPLEMENTATION_VERSION_NAME
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEG2000Lossless, RLELossless])
@pytest.mark.parametrize("sop_instance", ["1.2.3", "1.2.34", "2.25." + "9" * 59, "1." + "2" * 62])
def test_canonical_file_meta_is_byte_identical_to_pydicoms(syntax: str, sop_instance: str) -> None:
    # Payload digests include these bytes: a different encoding would change every digest.
    for sop_class in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.12.1"):
        assert dicomfile.canonical_file_meta(sop_class, sop_instance, syntax) == _pydicom_meta(sop_class, sop_instance, syntax)


def test_canonical_file_meta_reads_back() -> None:
    data = dicomfile.canonical_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", ExplicitVRLittleEndian)
    meta, offset = dicomfile.split_file_meta(io.BytesIO(data))
    assert offset == len(data)
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationVersionName == dicomfile.IMPLEMENTATION_VERSION_NAME


def _corpus() -> list[str]:
    """Every file of pydicom's test files and of pydicom-data (the interop tests' corpus)."""
    from tests.interop.corpus import sample_sources

    return sorted(str(p) for folder in sample_sources().values() for p in folder.rglob("*")
                  if p.is_file() and p.stat().st_size < 50_000_000)


def _previous_reading(path: str) -> tuple[str, dict] | str:
    """The three-parse reading ingest used before :func:`dicomfile.inspect` (pydicom's dcmread)."""
    with open(path, "rb") as fp:
        try:
            meta, offset = dicomfile.split_file_meta(fp)
            attrs = dicomfile.read_index_attributes(fp)
            dicomfile.check_complete(fp, offset, str(meta.get("TransferSyntaxUID", "")))
        except dicomfile.MalformedDicom:
            return "malformed"
    return str(meta.get("TransferSyntaxUID", "")), attrs.values


def test_inspect_reads_what_dcmread_reads_for_every_sample_file() -> None:
    # Every transfer syntax, character set and oddity in pydicom's test files: the one-walk reading
    # must index exactly what a full pydicom parse of the same file gives, and refuse the same files.
    checked = 0
    for path in _corpus():
        before = _previous_reading(path)
        with open(path, "rb") as fp:
            try:
                found = dicomfile.inspect(fp)
                now: tuple[str, dict] | str = (found.transfer_syntax_uid, found.attributes.values)
            except dicomfile.MalformedDicom:
                now = "malformed"
        assert now == before, path
        checked += 1
    assert checked > 100
