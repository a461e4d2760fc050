"""Fuzzing of what parses untrusted input: the receiver's one-walk reader (dicomfile.inspect, and the
ingest path around it) and the C-FIND / QIDO-RS query parsing.

Property: whatever the bytes or parameters, only the defined "bad input" errors come out
(MalformedDicom; QueryError / BadRequest; a failure status from the C-FIND handler), never another
exception, and every example ends within the deadline (a hang fails the test by pytest-timeout).

Budget: the default profile runs ``max_examples`` 200 per target (about 10 s for the whole module on
this 2-core machine). A longer run: ``DICOMGRID_FUZZ=long`` (20,000 examples per target, no per-example
deadline), or ``DICOMGRID_FUZZ_EXAMPLES=N`` for any count; see the README's testing section.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from dicomgrid.consumers.qido import BadRequest, parse_search
from dicomgrid.consumers.query import (
    ATTRIBUTES,
    MODEL_LEVELS,
    PATIENT_ROOT_FIND,
    SITE_KEYS,
    STUDY_ROOT_FIND,
    Level,
    QueryEngine,
    QueryError,
    SiteAnswers,
)
from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.config import LimitsConfig
from dicomgrid.core.dicomfile import MalformedDicom, canonical_file_meta, inspect
from dicomgrid.core.events import Source
from dicomgrid.producers.ingest import Ingestor
from tests.unit.test_ingest import FakePublisher
from tests.unit.test_query_matching import CancellingEvent, FakeIndex, site_context

_LONG = os.environ.get("DICOMGRID_FUZZ") == "long"
EXAMPLES = int(os.environ.get("DICOMGRID_FUZZ_EXAMPLES", 20_000 if _LONG else 200))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None if _LONG else 2000,  # ms per example; the slowest inputs here take ~50 ms
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    derandomize=not _LONG,  # the suite's run is reproducible; a long run explores
    print_blob=True,
)
pytestmark = [pytest.mark.timeout(600 if _LONG else 120),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# Part 10 files of pydicom's test set: every transfer syntax family the walker handles (explicit and
# implicit VR, big endian, deflated, encapsulated), nested sequences, private tags, a bad VR.
SAMPLE_NAMES = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
                "rtplan.dcm", "rtstruct.dcm", "nested_priv_SQ.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "badVR.dcm",
                "rtdose.dcm", "ExplVR_BigEnd.dcm", "SC_rgb.dcm"]
SAMPLES = [Path(p).read_bytes() for p in (get_testdata_file(n) for n in SAMPLE_NAMES) if p]


@st.composite
def mutated_part10(draw: st.DrawFn) -> bytes:
    """A sample file, then a few of: truncation, byte flips, random insertions, deletions, splices of
    another sample, overwritten length fields (the walker's favourite place to go wrong)."""
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "splice", "length"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(0, max(0, len(data) - 1)))
                if data:
                    data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 256))]
        elif kind == "splice":
            other = draw(st.sampled_from(SAMPLES))
            start = draw(st.integers(0, len(other) - 1))
            data[at:] = other[start:start + draw(st.integers(1, 4096))]
        else:
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFE, 0x80000000]))
            data[at:at + 4] = struct.pack("<L", value)
    return bytes(data)


# Hand-made edge cases kept as explicit examples: deep nesting, an empty file, meta only.
_IMPLICIT_META = canonical_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2")
_NESTED = (struct.pack("<HHL", 0x0008, 0x1115, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)) * 5000
_DEFLATED_META = canonical_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1.99")


@FUZZ
@given(mutated_part10())
@example(_IMPLICIT_META + _NESTED)
@example(b"")
@example(_IMPLICIT_META)
@example(_DEFLATED_META + b"\x03\x00")
def test_the_one_walk_reader_only_ever_refuses_with_malformed_dicom(data: bytes):
    try:
        inspect(io.BytesIO(data))
    except MalformedDicom:
        pass


@FUZZ
@given(st.binary(max_size=2048))
def test_the_one_walk_reader_on_random_bytes(data: bytes):
    for payload in (data, _IMPLICIT_META + data, b"\x00" * 128 + b"DICM" + data):
        try:
            inspect(io.BytesIO(payload))
        except MalformedDicom:
            pass


@pytest.fixture(scope="module")
def ingestor(tmp_path_factory: pytest.TempPathFactory) -> Ingestor:
    publisher = FakePublisher()
    root = tmp_path_factory.mktemp("fuzz-blobs")
    ingestor = Ingestor("A", BlobStore(root, "A"), publisher, None, AuditTrail("A", publisher),
                        max_instance_bytes=1 << 20)
    return ingestor


@FUZZ
@given(mutated_part10())
def test_ingest_answers_every_mutated_file_with_an_outcome(ingestor: Ingestor, data: bytes):
    """The whole receive path after the network: validate, store, announce (in-memory broker)."""
    result = ingestor.ingest(io.BytesIO(data), Source("DIMSE", "STORESCU", "GRID_A", "127.0.0.1:1"))
    assert result.outcome is not None
    ingestor.publisher.events.clear()  # type: ignore[attr-defined]


# -- queries ---------------------------------------------------------------------------------------

KEYWORDS = sorted([*ATTRIBUTES, *SITE_KEYS, "QueryRetrieveLevel", "SpecificCharacterSet", "InstitutionName",
                   "OtherPatientIDsSequence"])
QUERY_TEXT = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["*", "?", "Doe*", "*^J?ne", "20240101-", "-20240101", "20240101-20231231", "1.2.3\\1.2.4",
                     "1.2.3,1.2.4", "010101.123456-235960", "CT\\MR", "", " ", "\x00", "\\", "=", "^^^", "-"]),
    st.from_regex(r"[0-9.*?\\,\-]{0,70}", fullmatch=True),
)


@pytest.fixture(scope="module")
def index() -> FakeIndex:
    fake = FakeIndex()
    fake.add("1.1", "P1", "Doe^Jane", "20240102", "A1", {"1.1.1": "CT", "1.1.2": "SR"})
    fake.add("1.2", "P2", "Müller^Jürgen=山田^太郎", "20240315", "A2", {"1.2.1": "MR"})
    return fake


@FUZZ
@given(level=st.sampled_from(list(Level)[1:]), flat=st.booleans(),
       params=st.lists(st.tuples(st.one_of(st.sampled_from([*KEYWORDS, "limit", "offset", "fuzzymatching",
                                                             "includefield", "00100010", "0020000D", "7FE00010",
                                                             "PatientName.x", "00100010.00100020"]),
                                           st.text(max_size=20)),
                                 QUERY_TEXT), max_size=8),
       path=st.dictionaries(st.sampled_from(["StudyInstanceUID", "SeriesInstanceUID"]), QUERY_TEXT, max_size=2))
def test_qido_parameters_only_ever_fail_as_bad_requests(index: FakeIndex, level, flat, params, path):
    limits = LimitsConfig(qido_max_results=5, qido_max_offset=50, query_scan_budget_rows=50)
    try:
        search = parse_search(level, params, path, flat=flat, limits=limits)
    except (BadRequest, QueryError):
        return
    assert 0 <= search.limit <= 5 and 0 <= search.offset <= 50
    answers = SiteAnswers("GRID_A", "http://x/dicomweb")
    try:
        for record in QueryEngine(index, scan_budget=limits.query_scan_budget_rows).find(search.query):  # type: ignore[arg-type]
            search.query.response(record, answers).to_json_dict()
    except QueryError:  # the scan budget
        pass


@st.composite
def identifiers(draw: st.DrawFn) -> bytes:
    """A C-FIND identifier as it comes off the wire: an encoded data set of query keys, sometimes
    mangled afterwards."""
    ds = Dataset()
    ds.QueryRetrieveLevel = draw(st.sampled_from(["PATIENT", "STUDY", "SERIES", "IMAGE", "", "WORLD"]))
    for keyword in draw(st.lists(st.sampled_from(KEYWORDS), max_size=6, unique=True)):
        if keyword == "OtherPatientIDsSequence":
            ds.OtherPatientIDsSequence = [Dataset()]
            continue
        value = draw(QUERY_TEXT)
        try:
            setattr(ds, keyword, value)
        except Exception:  # pydicom refuses some values for some VRs: the sender would, too
            continue
    implicit = draw(st.booleans())
    try:
        data = encode(ds, implicit, True)
    except Exception:
        data = None
    data = data if data is not None else b""
    if draw(st.booleans()) and data:
        raw = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            del raw[draw(st.integers(0, len(raw) - 1)):]
        data = bytes(raw)
    return (b"I" if implicit else b"E") + data


class WireEvent(CancellingEvent):
    """A C-FIND event whose identifier is decoded from bytes when first read, as pynetdicom does."""

    def __init__(self, raw: bytes, model: str) -> None:
        super().__init__(Dataset())
        self._raw = raw
        self.request.AffectedSOPClassUID = model

    @property
    def identifier(self) -> Dataset:
        return decode(io.BytesIO(self._raw[1:]), self._raw[:1] == b"I", True)

    @identifier.setter
    def identifier(self, value: Dataset) -> None:
        pass


@FUZZ
@given(raw=identifiers(), model=st.sampled_from([STUDY_ROOT_FIND, PATIENT_ROOT_FIND]))
@example(raw=b"E" + b"\xff" * 11, model=STUDY_ROOT_FIND)
def test_c_find_answers_every_identifier_with_a_status(index: FakeIndex, raw: bytes, model: str):
    from dicomgrid.consumers.find_scp import FindService

    assert model in MODEL_LEVELS
    ctx = site_context(index, LimitsConfig(query_scan_budget_rows=50))
    event = WireEvent(raw, model)
    statuses = []
    for status, identifier in FindService(ctx).on_find(event):
        code = status if isinstance(status, int) else status.Status
        statuses.append(code)
        if identifier is not None:
            encode(identifier, False, True)  # every answer can be put on the wire
    assert all(code in (0xFF00, 0xFF01) for code in statuses[:-1])
    assert not statuses or statuses[-1] in (0xFF00, 0xFF01, 0xA700, 0xA900, 0xC000, 0xC001, 0xFE00)
    assert len(ctx.audit.records) == 1  # and every query is audited, whatever its outcome
