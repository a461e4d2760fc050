"""The ingest path with a real blob store and an in-memory stand-in for the brokers."""

import io
import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from dicomgrid import schemas
from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.dicomfile import IMPLEMENTATION_CLASS_UID, split_file_meta
from dicomgrid.core.events import Source
from dicomgrid.core.kafka import PublishError
from dicomgrid.producers.ingest import Expected, Ingestor, Outcome
from tests.dicom_samples import make_instance, to_part10

SOURCE = Source("DIMSE", "STORESCU", "GRID_A", "127.0.0.1:5000")


class FakePublisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.down = False

    def publish(self, topic: str, key: str, event: dict[str, Any]) -> Future:
        future: Future = Future()
        if self.down and topic != schemas.TOPIC_AUDIT:
            future.set_exception(PublishError("broker down"))
        else:
            self.events.append((topic, key, event))
            future.set_result(None)
        return future

    def publish_and_wait(self, topic, key, event, timeout=None):
        return self.publish(topic, key, event).result()

    def flush(self, timeout: float = 0) -> int:
        return 0

    def close(self, timeout: float = 0) -> None:
        pass

    def of(self, topic: str) -> list[dict[str, Any]]:
        return [e for t, _, e in self.events if t == topic]


class NoCassandra:
    """The receive path makes no Cassandra round trip: any use of the session fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"ingest used Cassandra ({name})")


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def ingestor(tmp_path: Path, publisher: FakePublisher) -> Ingestor:
    return Ingestor("A", BlobStore(tmp_path / "blobs", "A"), publisher, NoCassandra(), AuditTrail("A", publisher),
                    max_instance_bytes=1 << 20)


def ingest(ingestor: Ingestor, data: bytes, expected: Expected = Expected()):
    return ingestor.ingest(io.BytesIO(data), SOURCE, expected)


def test_stored_instance_is_durable_canonical_and_announced(ingestor, publisher):
    ds = make_instance()
    data = to_part10(ds)
    result = ingest(ingestor, data, Expected(ds.SOPClassUID, ds.SOPInstanceUID))
    assert result.outcome is Outcome.STORED
    (event,) = publisher.of(schemas.TOPIC_INSTANCE_STORED)
    schemas.validate_event(schemas.TOPIC_INSTANCE_STORED, event)
    assert event["study"]["uid"] == ds.StudyInstanceUID
    assert event["patient"]["name"] == "Doe^Jane"
    # Schema version 2: the indexer numbers versions (tests/integration/test_indexer.py).
    assert event["schema_version"] == 2 and "version" not in event and "replaces" not in event
    stored = ingestor.blobs.path(event["payload"]["sha256"]).read_bytes()
    # The data set bytes are exactly those received; only the file meta is the grid's own.
    _, in_offset = split_file_meta(io.BytesIO(data))
    meta, out_offset = split_file_meta(io.BytesIO(stored))
    assert stored[out_offset:] == data[in_offset:]
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    (audit,) = publisher.of(schemas.TOPIC_AUDIT)
    schemas.validate_event(schemas.TOPIC_AUDIT, audit)
    assert audit["outcome"] == 0


def test_identical_resend_is_idempotent(ingestor, publisher):
    data = to_part10(make_instance())
    ingest(ingestor, data)
    again = ingest(ingestor, data)
    assert again.outcome is Outcome.DUPLICATE and again.ok
    assert len(publisher.of(schemas.TOPIC_INSTANCE_STORED)) == 1


def test_different_bytes_for_known_uid_become_a_new_version(ingestor, publisher):
    ds = make_instance()
    first = ingest(ingestor, to_part10(ds)).event
    ds.PatientName = "Doe^John"
    second = ingest(ingestor, to_part10(ds)).event
    # Announced as a payload of its own for the same UID; the indexer makes it version 2.
    assert second is not None and second["payload"]["sha256"] != first["payload"]["sha256"]
    assert second["instance"]["sop_instance_uid"] == first["instance"]["sop_instance_uid"]
    assert len(publisher.of(schemas.TOPIC_INSTANCE_STORED)) == 2
    assert ingestor.blobs.exists(first["payload"]["sha256"])  # the earlier version is kept
    schemas.validate_event(schemas.TOPIC_INSTANCE_STORED, second)


def test_resend_after_a_failed_publish_is_announced(ingestor, publisher):
    # The payload was made durable but its event never confirmed: the stored bytes alone are no
    # identical resend, the retry must publish.
    data = to_part10(make_instance())
    publisher.down = True
    assert ingest(ingestor, data).outcome is Outcome.NO_EVENT_LOG
    publisher.down = False
    assert ingest(ingestor, data).outcome is Outcome.STORED
    assert ingest(ingestor, data).outcome is Outcome.DUPLICATE
    assert len(publisher.of(schemas.TOPIC_INSTANCE_STORED)) == 1


def test_payload_held_without_its_event_is_announced(ingestor, publisher):
    # E.g. a replica fetched from another site, then the same bytes sent to this one: announced here.
    data = to_part10(make_instance())
    first = ingest(ingestor, data).event
    os.removexattr(ingestor.blobs.path(first["payload"]["sha256"]), "user.dicomgrid.announced")
    assert ingest(ingestor, data).outcome is Outcome.STORED
    assert len(publisher.of(schemas.TOPIC_INSTANCE_STORED)) == 2


@pytest.mark.parametrize(
    "changes, outcome",
    [
        ({"StudyInstanceUID": "../../etc"}, Outcome.BAD_UID),
        ({"SOPInstanceUID": "1." + "2" * 199}, Outcome.BAD_UID),
        ({"SeriesInstanceUID": "1.2.abc"}, Outcome.BAD_UID),
        ({"StudyInstanceUID": ""}, Outcome.BAD_UID),
    ],
)
def test_hostile_uids_are_refused_without_side_effects(ingestor, publisher, changes, outcome):
    ds = make_instance()
    for key, value in changes.items():
        setattr(ds, key, value)
    result = ingest(ingestor, to_part10(ds))
    assert result.outcome is outcome and not result.ok
    assert publisher.of(schemas.TOPIC_INSTANCE_STORED) == []
    assert list(ingestor.blobs.digests()) == []
    (audit,) = publisher.of(schemas.TOPIC_AUDIT)
    assert audit["outcome"] != 0


@pytest.mark.parametrize("keyword", ["PatientName", "ReferringPhysicianName", "StudyDescription"])
def test_overlong_indexed_text_is_refused_by_name_without_its_value(ingestor, publisher, keyword):
    ds = make_instance()
    setattr(ds, keyword, "Q" * 10_000)
    result = ingest(ingestor, to_part10(ds), Expected(ds.SOPClassUID, ds.SOPInstanceUID))
    assert result.outcome is Outcome.TEXT_TOO_LONG and result.outcome.status == 0xC002
    assert keyword in result.error_comment and len(result.error_comment) <= 64
    assert "QQ" not in result.error_comment
    assert publisher.of(schemas.TOPIC_INSTANCE_STORED) == []
    assert list(ingestor.blobs.digests()) == []
    (audit,) = publisher.of(schemas.TOPIC_AUDIT)
    assert audit["outcome"] != 0 and keyword in audit["outcome_description"] and "QQ" not in str(audit)


def test_missing_uid_is_refused(ingestor, publisher):
    ds = make_instance()
    del ds.SeriesInstanceUID
    assert ingest(ingestor, to_part10(ds)).outcome is Outcome.BAD_UID


def test_request_and_data_set_must_agree(ingestor, publisher):
    ds = make_instance()
    result = ingest(ingestor, to_part10(ds), Expected(ds.SOPClassUID, "1.2.3.4"))
    assert result.outcome is Outcome.MISMATCH
    result = ingest(ingestor, to_part10(ds), Expected("1.2.840.10008.5.1.4.1.1.4", ds.SOPInstanceUID))
    assert result.outcome is Outcome.MISMATCH
    assert publisher.of(schemas.TOPIC_INSTANCE_STORED) == []


@pytest.mark.parametrize("cut", [10, 131, 200, -40])
def test_truncated_and_garbage_input_is_malformed(ingestor, publisher, cut):
    data = to_part10(make_instance())
    result = ingest(ingestor, data[:cut])
    assert result.outcome in (Outcome.MALFORMED, Outcome.BAD_UID)
    assert list(ingestor.blobs.digests()) == []


def test_garbage_bytes(ingestor):
    assert ingest(ingestor, b"\x00" * 128 + b"DICM" + b"\xff" * 300).outcome is Outcome.MALFORMED
    assert ingest(ingestor, b"not dicom at all").outcome is Outcome.MALFORMED


def test_oversize_is_out_of_resources(ingestor, publisher):
    ds = make_instance(pixel_bytes=64)
    ds.PixelData = b"\x00" * (2 << 20)
    result = ingest(ingestor, to_part10(ds))
    assert result.outcome is Outcome.TOO_LARGE and result.outcome.status == 0xA702
    assert list(ingestor.blobs.digests()) == []


def test_broker_down_means_failure_status_and_no_event(ingestor, publisher):
    publisher.down = True
    result = ingest(ingestor, to_part10(make_instance()))
    assert result.outcome is Outcome.NO_EVENT_LOG and (result.outcome.status & 0xFF00) == 0xA700
    assert publisher.of(schemas.TOPIC_INSTANCE_STORED) == []


def test_index_unreachable_does_not_block_ingest(ingestor, publisher):
    # Nothing on the receive path asks Cassandra (the fixture's session fails on any use).
    assert ingest(ingestor, to_part10(make_instance())).outcome is Outcome.STORED
    ingestor.db = None
    assert ingest(ingestor, to_part10(make_instance())).outcome is Outcome.STORED


def test_non_ascii_names_are_decoded(ingestor, publisher):
    ds = make_instance(SpecificCharacterSet="ISO_IR 192", patient_name="Müller^Zoë")
    ingest(ingestor, to_part10(ds))
    (event,) = publisher.of(schemas.TOPIC_INSTANCE_STORED)
    assert event["patient"]["name"] == "Müller^Zoë"
    assert event["study"]["specific_character_set"] == "ISO_IR 192"
