"""What the stream processors accept, and what they set aside as dead letters."""

from __future__ import annotations

import base64
import io
import json

import pytest
from cassandra import InvalidRequest, OperationTimedOut
from cassandra.cluster import NoHostAvailable

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobRef
from dicomgrid.core.dicomfile import inspect
from dicomgrid.core.events import Source, dead_letter, instance_stored
from dicomgrid.processors.dead_letters import Rejected, decode, is_transient
from tests.dicom_samples import make_instance, to_part10


def stored_event() -> dict:
    found = inspect(io.BytesIO(to_part10(make_instance())))
    return instance_stored("A", Source("DIMSE", "STORESCU", "GRID_A"), found.attributes, found.transfer_syntax_uid,
                           BlobRef("A", "ab" * 32, 100))


def test_a_valid_event_is_decoded():
    event = stored_event()
    assert decode(json.dumps(event).encode(), schemas.TOPIC_INSTANCE_STORED) == event


@pytest.mark.parametrize("mutate, why", [
    (lambda e: b"{not json", "not JSON"),
    (lambda e: None, "invalid"),
    (lambda e: json.dumps({**e, "event_type": "dicom.audit"}).encode(), "event_type"),
    (lambda e: json.dumps({k: v for k, v in e.items() if k != "payload"}).encode(), "payload"),
    (lambda e: json.dumps({**e, "version": "one"}).encode(), "version"),
])
def test_a_message_that_breaks_the_contract_is_rejected(mutate, why):
    with pytest.raises(Rejected, match=why):
        decode(mutate(stored_event()), schemas.TOPIC_INSTANCE_STORED)


def test_only_infrastructure_failures_are_retried():
    assert is_transient(NoHostAvailable("down", {})) and is_transient(OperationTimedOut())
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(InvalidRequest("Term's size exceeds the limit"))
    assert not is_transient(KeyError("study"))


def test_dead_letters_keep_the_message_verbatim():
    record = dead_letter("indexer", "p.dicom.instance.stored", 3, 41, b"1.2.3", b"\xff\xfe not utf-8", "not JSON")
    schemas.validate_event(schemas.TOPIC_DEADLETTER, record)
    assert (record["topic"], record["partition"], record["offset"], record["key"]) == ("p.dicom.instance.stored", 3, 41,
                                                                                     "1.2.3")
    assert base64.b64decode(record["value_base64"]) == b"\xff\xfe not utf-8"


def test_every_replication_event_builder_matches_its_schema():
    from dicomgrid.core.events import InstanceRef, replica_stored, replication_failed, replication_requested

    stored = stored_event()
    instance = InstanceRef.of_event(stored)
    request = replication_requested(stored["payload"], "B", instance, cause_event_id=stored["event_id"])
    schemas.validate_event(schemas.TOPIC_REPLICATION_REQUESTED, request)
    assert InstanceRef.of_event(request) == instance
    schemas.validate_event(schemas.TOPIC_REPLICA_STORED,
                           replica_stored(BlobRef("B", "ab" * 32, 100), "A", instance, cause="replication",
                                          request_event_id=request["event_id"]))
    schemas.validate_event(schemas.TOPIC_REPLICATION_FAILED, replication_failed(request, "A: refused", retryable=True))
