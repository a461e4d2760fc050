"""Reading just enough of a DICOM file to index it, and the grid's canonical file meta.

Every payload in a blob store is ``preamble + DICM + canonical file meta + the data set exactly as
received``. The file meta (group 0002) is rebuilt by the grid from the SOP Class, SOP Instance and
Transfer Syntax UIDs only, so the same data set yields the same bytes, and hence the same digest,
whether it arrived by C-STORE, STOW-RS or replication, and whichever AE sent it.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag

# The grid's implementation identity in file meta (a UUID-derived UID under the 2.25 root).
IMPLEMENTATION_CLASS_UID = "2.25.40947379571910522469075162332634843739"
IMPLEMENTATION_VERSION_NAME = "DICOMGRID_1"

# Longest indexed text value (characters) an instance may carry; ingest refuses longer ones (0xC002)
# rather than index a clipped copy: Cassandra's SAI refuses terms over a few KiB, which would stall the
# indexer, events have size limits, and the standard's VRs allow 64 characters (LO, a PN group) or less.
MAX_TEXT = 1024

# What the index, C-FIND and QIDO-RS need. Everything else stays in the payload, unparsed.
INDEX_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "SeriesDate", "SeriesTime",
    "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
)


# The grid checks the values it relies on (UIDs) itself. pydicom's per-value checks on read only emit
# warnings, and cost a regular expression match for every element decoded on the ingest path.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


class MalformedDicom(ValueError):
    """The bytes are not a readable DICOM data set."""


def _element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002 (short or long length form)."""
    header = struct.pack("<HH", *tag) + vr
    if vr in (b"OB", b"UN"):
        return header + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return header + struct.pack("<H", len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


_META_HEAD = b"\x00" * 128 + b"DICM"
_META_VERSION = _element((0x0002, 0x0001), b"OB", b"\x00\x01")
_META_IMPLEMENTATION = _element((0x0002, 0x0012), b"UI", _uid(IMPLEMENTATION_CLASS_UID)) + _element(
    (0x0002, 0x0013), b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii") + b" " * (len(IMPLEMENTATION_VERSION_NAME) % 2)
)


def canonical_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` prefix and the grid's file meta group for one instance.

    Encoded directly (PS3.10 7.1): this runs once per received instance, and building a pydicom
    ``FileMetaDataset`` for six fixed elements cost more than hashing the payload. The bytes are
    exactly what pydicom's ``write_file_meta_info`` produces (a unit test holds them equal), so
    digests of stored payloads do not change.
    """
    body = (
        _META_VERSION
        + _element((0x0002, 0x0002), b"UI", _uid(sop_class_uid))
        + _element((0x0002, 0x0003), b"UI", _uid(sop_instance_uid))
        + _element((0x0002, 0x0010), b"UI", _uid(transfer_syntax_uid))
        + _META_IMPLEMENTATION
    )
    return _META_HEAD + _element((0x0002, 0x0000), b"UL", struct.pack("<L", len(body))) + body


def split_file_meta(fp: BinaryIO) -> tuple[Dataset, int]:
    """Read a Part 10 file's meta group; return it and the offset where the data set begins."""

    def past_group_2(tag: BaseTag, vr: str | None, length: int) -> bool:
        return tag.group != 2

    fp.seek(0)
    try:
        read_preamble(fp, False)
        meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=past_group_2)
        # pydicom decodes values lazily: decode them here, where a bad one is a malformed file, not
        # later in whoever reads the transfer syntax (found by fuzzing: an unknown VR in (0002,0010)
        # raised NotImplementedError from ingest).
        for _ in meta:
            pass
        end = fp.tell()
    except Exception as exc:  # pydicom raises many types on hostile input; all mean "cannot decode"
        raise MalformedDicom(f"unreadable file meta: {type(exc).__name__}: {exc}") from exc
    return meta, end


_GROUP_LENGTH_HEAD = b"\x02\x00\x00\x00UL\x04\x00"


def data_set_offset(data: bytes | memoryview) -> int:
    """Where the data set of a whole Part 10 file in memory begins (after its file meta group).

    Read from the group length when the file starts with it, as every file the grid writes does;
    otherwise by decoding the meta group (:func:`split_file_meta`).
    """
    if bytes(data[128:132]) == b"DICM" and bytes(data[132:140]) == _GROUP_LENGTH_HEAD and len(data) >= 144:
        offset = 144 + struct.unpack_from("<L", data, 140)[0]
        if offset <= len(data):
            return offset
    return split_file_meta(io.BytesIO(bytes(data)))[1]


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}
# Sequences nested deeper than this are refused: the walk recurses per level, and real objects nest a
# handful deep (SR content trees, the deepest, stay well below it). Found by fuzzing: 5,000 nested
# undefined-length sequences (100 KB) raised RecursionError instead of MalformedDicom.
MAX_SEQUENCE_DEPTH = 128
# A deflated data set is inflated whole in memory to decode it (pydicom reads it that way), and deflate
# expands up to ~1000x: a few MB sent could otherwise claim GBs of a receiver's memory.
MAX_INFLATED_BYTES = 512 * 1024**2


class _Walker:
    """Walks element headers to the end of a data set without reading values (O(elements) I/O).

    The position is counted here rather than asked of the file: a buffered file's ``tell()`` is a
    system call each time, two per element, and each one hands the GIL to another association's thread.
    """

    def __init__(self, fp: BinaryIO, start: int, end: int, implicit: bool, little: bool,
                 capture: frozenset[int] = frozenset()) -> None:
        self.fp, self.pos, self.end, self.implicit, self.little = fp, start, end, implicit, little
        self.order = "<" if little else ">"
        # Top-level elements whose raw values are kept while walking (the indexed attributes), and those
        # of them too long to keep.
        self.capture = capture
        self.captured: dict[int, RawDataElement] = {}
        self.oversized: set[int] = set()

    def _read(self, n: int) -> bytes:
        data = self.fp.read(n)
        if len(data) != n:
            raise MalformedDicom("data set is truncated")
        self.pos += n
        return data

    def _header(self, implicit: bool) -> tuple[int, bytes | None, int]:
        group, elem = struct.unpack(self.order + "HH", self._read(4))
        tag = group << 16 | elem
        if implicit or group == 0xFFFE:
            return tag, None, struct.unpack(self.order + "L", self._read(4))[0]
        vr = self._read(2)
        if vr in _LONG_VRS:
            self._read(2)
            return tag, vr, struct.unpack(self.order + "L", self._read(4))[0]
        return tag, vr, struct.unpack(self.order + "H", self._read(2))[0]

    def _skip(self, length: int) -> None:
        target = self.pos + length
        if target > self.end:
            raise MalformedDicom("an element runs past the end of the data")
        self.fp.seek(target)
        self.pos = target

    def dataset(self, implicit: bool, until_item_end: bool = False, depth: int = 0) -> None:
        top_level = not until_item_end
        while self.pos < self.end:
            tag, vr, length = self._header(implicit)
            if tag == _ITEM_END:
                if until_item_end:
                    return
                raise MalformedDicom("unexpected item delimiter")
            if top_level and tag in self.capture and length != _UNDEFINED and length <= _MAX_CAPTURE:
                at = self.pos
                value = self._read(length)
                self.captured[tag] = RawDataElement(
                    BaseTag(tag), vr.decode("ascii", "replace") if vr else None, length, value, at, implicit, self.little
                )
            elif length != _UNDEFINED:
                if top_level and tag in self.capture:
                    self.oversized.add(tag)
                self._skip(length)
            else:
                # Undefined length: a sequence or encapsulated pixel data; UN content is implicit VR.
                self.items(implicit or vr == b"UN", depth + 1)
        if until_item_end:
            raise MalformedDicom("data set is truncated inside a sequence item")

    def items(self, implicit: bool, depth: int = 1) -> None:
        if depth > MAX_SEQUENCE_DEPTH:
            raise MalformedDicom(f"sequences nested more than {MAX_SEQUENCE_DEPTH} deep")
        while True:
            tag, _, length = self._header(True)
            if tag == _SEQ_END:
                return
            if tag != _ITEM:
                raise MalformedDicom(f"expected an item, found tag {tag:08X}")
            if length == _UNDEFINED:
                self.dataset(implicit, until_item_end=True, depth=depth)
            else:
                self._skip(length)


def check_complete(fp: BinaryIO, offset: int, transfer_syntax_uid: str) -> None:
    """Raise :class:`MalformedDicom` unless the data set from ``offset`` is structurally whole.

    Catches truncated transfers and garbage that a partial parse (``stop_before_pixels``) would accept,
    without reading pixel data into memory.
    """
    _walk(fp, offset, transfer_syntax_uid, frozenset())


def _walk(fp: BinaryIO, offset: int, transfer_syntax_uid: str, capture: frozenset[int]) -> _Walker | None:
    """Check the data set is whole; returns the walker (with captured elements) unless it is deflated."""
    end = fp.seek(0, 2)
    fp.seek(offset)
    if transfer_syntax_uid in _DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = 0
        try:
            # Small input chunks bound the inflated output held at once (deflate expands <= ~1000x).
            while chunk := fp.read(16 * 1024):
                inflated += len(inflater.decompress(chunk))
                if inflated > MAX_INFLATED_BYTES:
                    raise MalformedDicom(f"deflated data set inflates to more than {MAX_INFLATED_BYTES} bytes")
        except zlib.error as exc:
            raise MalformedDicom(f"deflated data set is corrupt: {exc}") from exc
        if not inflater.eof:
            raise MalformedDicom("deflated data set is truncated")
        return None
    implicit = transfer_syntax_uid == "1.2.840.10008.1.2"
    little = transfer_syntax_uid != "1.2.840.10008.1.2.2"
    if not implicit:
        # Some writers encode implicit VR under an explicit transfer syntax; readers (pydicom, DCMTK)
        # detect it from the first element, and so does this check.
        first = fp.read(6)
        fp.seek(offset)
        implicit = len(first) == 6 and not first[4:6].isalpha()
    walker = _Walker(fp, offset, end, implicit, little, capture)
    try:
        walker.dataset(implicit)
    except struct.error as exc:
        raise MalformedDicom(f"data set is truncated: {exc}") from exc
    return walker


@dataclass(frozen=True)
class IndexAttributes:
    """The attributes an instance is indexed by, decoded to text (character set applied)."""

    values: dict[str, Any]
    # Indexed text attributes longer than MAX_TEXT characters: keyword -> length in characters (None
    # when the raw value was too long to read at all).
    too_long: dict[str, int | None] = field(default_factory=dict)

    def get(self, keyword: str) -> Any:
        return self.values.get(keyword)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00")
    return text or None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


_INT_KEYWORDS = {"SeriesNumber", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"}
_INDEX_TAG = {k: int(tag_for_keyword(k)) for k in INDEX_KEYWORDS}  # type: ignore[arg-type]
_INDEX_TAGS = frozenset(_INDEX_TAG.values())
# Raw values longer than this are not read (no character set makes 64 KiB fewer than MAX_TEXT characters).
_MAX_CAPTURE = 64 * 1024


def _attributes(ds: Dataset, oversized: frozenset[int] | set[int] = frozenset()) -> IndexAttributes:
    values: dict[str, Any] = {}
    too_long: dict[str, int | None] = {}
    for keyword in INDEX_KEYWORDS:
        raw = None if _INDEX_TAG[keyword] in oversized else ds.get(keyword)
        if keyword in _INT_KEYWORDS:
            values[keyword] = _int(raw)
            continue
        if _INDEX_TAG[keyword] in oversized:
            values[keyword], too_long[keyword] = None, None
            continue
        if keyword == "SpecificCharacterSet":
            values[keyword] = _text("\\".join(raw) if isinstance(raw, MultiValue) else raw)
        else:
            values[keyword] = _text(raw)
        if values[keyword] is not None and len(values[keyword]) > MAX_TEXT:
            too_long[keyword] = len(values[keyword])
    return IndexAttributes(values, too_long)


# The values a character set applies to (PS3.5 6.1.2.3); every other string VR is the default repertoire.
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "PN", "UC"})
# Single-byte or UTF-8 character sets (and none), decoded here as pydicom would; any other (ISO 2022 code
# extensions, GB18030, ...) is left to pydicom. pydicom reads the default repertoire as ISO 8859-1.
_DIRECT_CHARSETS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
_INDEX_VR = {tag: dictionary_VR(tag) for tag in _INDEX_TAGS}
_CHARSET_TAG = _INDEX_TAG["SpecificCharacterSet"]
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _direct_attributes(captured: dict[int, RawDataElement], little: bool,
                       oversized: frozenset[int] | set[int]) -> IndexAttributes | None:
    """:func:`_attributes` of the captured raw elements, decoded without pydicom; the same values
    (a unit test holds them equal). None where pydicom must decode: another character set, a value
    with several items, an integer string that is not plain, a VR other than the dictionary's.

    pydicom's decoding of a data set, element by element, was a third of the receive path's CPU.
    """
    charset_element = captured.get(_CHARSET_TAG)
    charset = charset_element.value.decode("latin_1").strip(" \x00") if charset_element is not None \
        and charset_element.value else ""
    encoding = _DIRECT_CHARSETS.get(charset)
    if encoding is None:
        return None
    values: dict[str, Any] = {}
    too_long: dict[str, int | None] = {}
    for keyword, tag in _INDEX_TAG.items():
        if tag in oversized:
            values[keyword] = None
            if keyword not in _INT_KEYWORDS:
                too_long[keyword] = None
            continue
        element = captured.get(tag)
        if element is None:
            values[keyword] = None
            continue
        vr = _INDEX_VR[tag]
        if element.VR is not None and element.VR != vr:
            return None
        data = element.value or b""
        if vr == "US":
            if len(data) not in (0, 2):
                return None
            values[keyword] = struct.unpack("<H" if little else ">H", data)[0] if data else None
            continue
        if b"\\" in data:
            return None
        try:
            text = data.decode(encoding if vr in _TEXT_VRS else "latin_1")
        except UnicodeDecodeError:
            return None
        value = _text(text.rstrip("\x00 "))
        if keyword in _INT_KEYWORDS:
            if value is not None and not _INTEGER.fullmatch(value):
                return None
            values[keyword] = _int(value)
            continue
        values[keyword] = value
        if value is not None and len(value) > MAX_TEXT:
            too_long[keyword] = len(value)
    return IndexAttributes(values, too_long)


def read_index_attributes(fp: BinaryIO) -> IndexAttributes:
    """Parse only the indexed attributes of a Part 10 file; pixel data is never read.

    Raises :class:`MalformedDicom` when the data set cannot be decoded.
    """
    fp.seek(0)
    try:
        ds = dcmread(fp, stop_before_pixels=True, specific_tags=list(INDEX_KEYWORDS), force=False)
        return _attributes(ds)
    except MalformedDicom:
        raise
    except Exception as exc:  # pydicom raises many types on hostile input; all mean "cannot decode"
        raise MalformedDicom(f"cannot decode data set: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Inspection:
    """What ingest needs from a received Part 10 file, from one pass over it."""

    offset: int  # where the data set begins, after the file meta
    transfer_syntax_uid: str
    attributes: IndexAttributes


def inspect(fp: BinaryIO, data_set_at: tuple[int, str] | None = None) -> Inspection:
    """Read the file meta, check the data set is whole and decode its indexed attributes.

    One walk over the element headers does both the completeness check and the collection of the
    indexed elements' raw values, which pydicom then decodes (character sets included); a second
    parse by ``dcmread`` is needed only for deflated data sets. Raises :class:`MalformedDicom`.

    ``data_set_at`` (offset, transfer syntax UID): given by a caller that wrote the file meta itself
    (the storage path writes the canonical one), so it is not decoded again.
    """
    if data_set_at is None:
        meta, offset = split_file_meta(fp)
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
    else:
        offset, syntax = data_set_at
    walker = _walk(fp, offset, syntax, _INDEX_TAGS)
    if walker is None:
        return Inspection(offset, syntax, read_index_attributes(fp))
    direct = _direct_attributes(walker.captured, walker.little, walker.oversized)
    if direct is not None:
        return Inspection(offset, syntax, direct)
    try:
        ds = Dataset(walker.captured)
        ds.set_original_encoding(walker.implicit, walker.little)
        return Inspection(offset, syntax, _attributes(ds, walker.oversized))
    except Exception as exc:  # pydicom raises many types on hostile input; all mean "cannot decode"
        raise MalformedDicom(f"cannot decode data set: {type(exc).__name__}: {exc}") from exc
