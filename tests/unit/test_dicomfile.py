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


def _inspect(data: bytes) -> dicomfile.Inspection:
    return dicomfile.inspect(io.BytesIO(data))


def test_inspect_refuses_truncated_and_garbled_data_sets() -> None:
    from tests.dicom_samples import make_instance, to_part10

    good = to_part10(make_instance(patient_name="Doe^Jane"))
    assert _inspect(good).attributes.get("PatientName") == "Doe^Jane"
    meta_end = dicomfile.split_file_meta(io.BytesIO(good))[1]
    for cut in (meta_end + 9, len(good) - 5):
        with pytest.raises(dicomfile.MalformedDicom):
            _inspect(good[:cut])
    # Less than one element header after the file meta reads as an empty data set: no UIDs, which
    # ingest refuses with 0xC001.
    assert _inspect(good[:meta_end + 3]).attributes.get("SOPInstanceUID") is None
    # An element header whose VR bytes are not text: refused, not a crash of another kind.
    garbled = bytearray(good)
    garbled[meta_end + 4: meta_end + 6] = b"\xff\xfe"
    with pytest.raises(dicomfile.MalformedDicom):
        _inspect(bytes(garbled))


def test_inspect_ignores_an_oversized_indexed_value_instead_of_holding_it() -> None:
    from tests.dicom_samples import make_instance, to_part10

    # 100 KB of study description: the walk does not keep it, and the instance still reads.
    data = to_part10(make_instance(StudyDescription="x" * 100_000))
    found = _inspect(data)
    assert found.attributes.get("StudyDescription") is None
    assert found.attributes.get("PatientName") == "Doe^Jane"
    # ... but it is reported, so ingest can refuse the instance rather than index it without it.
    assert found.attributes.too_long == {"StudyDescription": None}


@pytest.mark.parametrize("deflated", [False, True])
def test_indexed_text_is_kept_whole_up_to_the_limit_and_reported_beyond(deflated: bool) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    from tests.dicom_samples import make_instance, to_part10

    syntax = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    name = "N" * (dicomfile.MAX_TEXT - 2) + "^Y"
    at_limit = _inspect(to_part10(make_instance(patient_name=name), syntax)).attributes
    assert at_limit.get("PatientName") == name and at_limit.too_long == {}
    # Characters, not bytes, count: 1,025 two-byte characters are over the limit, 1,024 are not.
    over = _inspect(to_part10(make_instance(patient_name="é" * 1025, SpecificCharacterSet="ISO_IR 192"), syntax))
    assert over.attributes.too_long == {"PatientName": 1025}
    fits = _inspect(to_part10(make_instance(patient_name="é" * 1024, SpecificCharacterSet="ISO_IR 192"), syntax))
    assert fits.attributes.too_long == {} and fits.attributes.get("PatientName") == "é" * 1024


# -- hostile structure (found by fuzzing, tests/unit/test_fuzz.py) ---------------------------------


def _implicit_meta() -> bytes:
    return dicomfile.canonical_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2")


def test_deeply_nested_sequences_are_malformed_not_a_recursion_error():
    import struct

    level = struct.pack("<HHL", 0x0008, 0x1115, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    with pytest.raises(dicomfile.MalformedDicom, match="nested more than 128 deep"):
        dicomfile.inspect(io.BytesIO(_implicit_meta() + level * 5000))


def test_an_undecodable_file_meta_value_is_malformed():
    data = bytearray(_implicit_meta())
    at = data.index(b"UI\x12\x00")  # the Transfer Syntax UID's VR
    data[at:at + 2] = b"U\x00"
    with pytest.raises(dicomfile.MalformedDicom, match="unreadable file meta"):
        dicomfile.inspect(io.BytesIO(bytes(data)))


def test_a_deflate_bomb_is_refused_before_it_is_inflated_whole(monkeypatch):
    import zlib

    monkeypatch.setattr(dicomfile, "MAX_INFLATED_BYTES", 1024**2)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflate.compress(b"\x00" * (8 * 1024**2)) + deflate.flush()
    meta = dicomfile.canonical_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1.99")
    with pytest.raises(dicomfile.MalformedDicom, match="inflates to more than"):
        dicomfile.inspect(io.BytesIO(meta + bomb))


def _both_readings(data: bytes):
    """The direct decoding of the indexed elements and pydicom's, of one Part 10 file."""
    from pydicom.dataset import Dataset

    fp = io.BytesIO(data)
    _, offset = dicomfile.split_file_meta(fp)
    syntax = str(dicomfile.split_file_meta(fp)[0].TransferSyntaxUID)
    walker = dicomfile._walk(fp, offset, syntax, dicomfile._INDEX_TAGS)
    ds = Dataset(walker.captured)
    ds.set_original_encoding(walker.implicit, walker.little)
    return (dicomfile._direct_attributes(walker.captured, walker.little, walker.oversized),
            dicomfile._attributes(ds, walker.oversized))


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"])
@pytest.mark.parametrize("charset, name, description", [
    (None, "Doe^Jane", "CT HEAD"),
    ("ISO_IR 100", "Müller^Jürgen", "Schädel nativ"),
    ("ISO_IR 192", "山田^太郎=やまだ^たろう", "頭部 CT"),
    ("ISO_IR 6", "Doe^John  ", "padded  "),
    ("ISO 2022 IR 87", "Yamada^Tarou", "plain"),  # left to pydicom
    ("\\ISO 2022 IR 87", "Yamada^Tarou", "two charsets"),  # left to pydicom
])
@pytest.mark.parametrize("oddity", ["none", "nul padding", "two values", "integer strings", "empty", "utf8 invalid"])
def test_the_direct_decoding_gives_what_pydicom_gives(syntax, charset, name, description, oddity):
    from tests.dicom_samples import make_instance, to_part10

    ds = make_instance(patient_name=name)
    if charset is not None:
        ds.SpecificCharacterSet = charset.split("\\") if "\\" in charset else charset
    ds.StudyDescription = description
    ds.InstanceNumber, ds.SeriesNumber = "7", "-2"
    if oddity == "two values":
        ds.StudyDescription = ["A", "B"]
    elif oddity == "integer strings":
        ds.InstanceNumber, ds.SeriesNumber = " +12 ", "3.0"
    elif oddity == "empty":
        ds.StudyDescription, ds.InstanceNumber, ds.PatientName = "", None, ""
    ds.file_meta.TransferSyntaxUID = syntax
    data = to_part10(ds, syntax)
    if oddity == "nul padding":
        data = data.replace(b"CT HEAD", b"CT HEA\x00")
    if oddity == "utf8 invalid" and charset == "ISO_IR 192":
        data = data.replace("頭部".encode(), b"\xff\xfe\xfd\xfc\xfb\xfa")
    direct, by_pydicom = _both_readings(data)
    if direct is not None:
        assert direct == by_pydicom
    plain = charset in (None, "ISO_IR 100", "ISO_IR 192", "ISO_IR 6") and oddity in ("none", "nul padding", "empty")
    if plain:
        assert direct is not None, "the common case is decoded directly"
