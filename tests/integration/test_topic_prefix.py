"""Two grids on one Kafka cluster with different topic prefixes do not see each other's events."""

from __future__ import annotations

import io

import pytest

from dicomgrid import schemas
from dicomgrid.core.audit import AuditTrail
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.events import Source
from dicomgrid.core.kafka import delete_topics, ensure_topics
from dicomgrid.producers.ingest import Ingestor
from tests.dicom_samples import make_instance, to_part10
from tests.grid import committed_lag, processors_assignment, wait_for
from tests.integration.test_ingest_grid import c_store, events_for

pytestmark = [pytest.mark.cluster]


@pytest.fixture
def other_grid(grid):
    """A second grid on the same cluster and keyspace, differing only in name and topic prefix; its
    topics are deleted after the test."""
    name = f"{grid.config.name}-other"
    other = grid.config.model_copy(
        update={"name": name, "kafka": grid.config.kafka.model_copy(update={"topic_prefix": f"{name}."})}
    )
    topics = {other.kafka.topic(t) for t in schemas.topics()}
    assert set(ensure_topics(other.kafka)) == topics
    yield other
    assert set(delete_topics(other.kafka)) == topics


def test_grids_with_different_prefixes_do_not_see_each_others_instance_events(
    grid, other_grid, taps, publishers, metadata_dc1, tmp_path
):
    # The other grid ingests in process through the same path as a receiver.
    publisher = publishers(other_grid.kafka, "test-other-grid")
    ingestor = Ingestor("A", BlobStore(tmp_path / "blobs", "A"), publisher, None, AuditTrail("A", publisher))
    own_tap, other_tap = taps(), taps(config=other_grid)
    foreign, own = make_instance(), make_instance()
    assert ingestor.ingest(io.BytesIO(to_part10(foreign)), Source("DIMSE", "STORESCU", "GRID_A")).ok
    assert c_store(grid.site("A"), [own]) == [0]

    assert len(events_for(own_tap, [own.SOPInstanceUID])) == 1
    assert len(events_for(other_tap, [foreign.SOPInstanceUID])) == 1
    assert {e["instance"]["sop_instance_uid"] for e in own_tap.catch_up()} == {own.SOPInstanceUID}
    assert {e["instance"]["sop_instance_uid"] for e in other_tap.catch_up()} == {foreign.SOPInstanceUID}

    # The grid's processors index its own instance and never the other grid's, published before it:
    # every topic they read (instance events, audit events) is their own grid's, and they have
    # committed all of its instance events.
    wait_for(lambda: metadata_dc1.study(own.StudyInstanceUID))
    assigned = set(wait_for(lambda: processors_assignment(grid.config)))
    assert grid.config.kafka.topic(schemas.TOPIC_INSTANCE_STORED) in assigned
    assert assigned <= {grid.config.kafka.topic(t) for t in schemas.topics()}
    assert not assigned & {other_grid.kafka.topic(t) for t in schemas.topics()}
    wait_for(lambda: committed_lag(grid.config) == 0)
    assert metadata_dc1.study(foreign.StudyInstanceUID) is None
