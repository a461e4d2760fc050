"""Session fixtures for tests that need running grid services (receivers, DICOMweb, processors)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from dicomgrid import schemas
from dicomgrid.core.cassandra import apply_schema, connect
from dicomgrid.core.config import GridConfig, KafkaConfig, SiteConfig
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.core.kafka import EventPublisher, delete_topics, ensure_topics
from dicomgrid.core.pki import ensure_material
from dicomgrid.supervisor import Supervisor
from tests.grid import (
    TEST_GRID_PREFIX,
    EventTap,
    index_reader,
    load_test_config,
    processors_joined,
    test_keyspace,
    wait_for,
    web,
    write_test_config,
)


@dataclass
class Grid:
    config: GridConfig
    config_file: Path
    supervisor: Supervisor

    def site(self, name: str) -> SiteConfig:
        return self.config.site(name)

    def metadata(self, dc: str) -> IndexReader:
        return index_reader(self.config, dc)


def _orphaned(grid_name: str) -> bool:
    """Whether the pytest session that named a test grid (``<prefix><pid>[-suffix]``) is gone."""
    owner = grid_name.removeprefix(TEST_GRID_PREFIX).split("-", 1)[0]
    return owner.isdigit() and not Path(f"/proc/{owner}").exists()


def keyspaces(cluster: GridConfig) -> list[str]:
    db, session = connect(cluster, keyspace=False)
    try:
        return [row.keyspace_name for row in session.execute("SELECT keyspace_name FROM system_schema.keyspaces")]
    finally:
        db.shutdown()


def drop_keyspace(cluster: GridConfig, keyspace: str) -> None:
    db, session = connect(cluster, keyspace=False)
    try:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
    finally:
        db.shutdown()


def _stop_orphaned_test_grids(cluster: GridConfig) -> None:
    """Stop the services and delete the topics of test grids whose pytest session died without cleaning up."""
    for run_dir in (cluster.root / "run" / "grid").glob(f"{TEST_GRID_PREFIX}*"):
        if _orphaned(run_dir.name):
            Supervisor.stop_pid_files(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
    topics = AdminClient(cluster.kafka.client_config()).list_topics(timeout=10).topics
    for grid_name in {t.split(".", 1)[0] for t in topics if t.startswith(TEST_GRID_PREFIX)}:
        if _orphaned(grid_name):
            delete_topics(cluster.kafka.model_copy(update={"topic_prefix": f"{grid_name}."}))
    prefix = test_keyspace(TEST_GRID_PREFIX)
    for keyspace in keyspaces(cluster):
        if keyspace.startswith(prefix) and _orphaned(keyspace.replace("_", "-")):
            drop_keyspace(cluster, keyspace)


@pytest.fixture(scope="session")
def grid(cluster: GridConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    """A two-site test grid with every service running, on the session's local cluster.

    Each session gets its own grid name (consumer group, pid files, topic prefix) and free ports, so
    sessions can run side by side on one cluster; its topics and keyspace are deleted at the end.
    """
    _stop_orphaned_test_grids(cluster)
    base = tmp_path_factory.mktemp("grid")
    name = f"{TEST_GRID_PREFIX}{os.getpid()}"
    config_file = write_test_config(base / "grid.toml", name, cluster.root, base / "sites")
    config = load_test_config(config_file)
    ensure_material(config)  # what `dicomgrid up` makes in development: a local CA, certificates, token keys
    # A keyspace under this session's name was left by a dead session that had the same pid (pids
    # wrap): its audit chain was signed with that session's key (each session makes its own now).
    drop_keyspace(cluster, config.cassandra.keyspace)
    apply_schema(config)
    ensure_topics(config.kafka)
    supervisor = Supervisor(config, str(config_file))
    web.config = config
    try:
        supervisor.up(timeout=90)
        # The processors are "up" once their processes run; they index only once the group has
        # formed, and a test waiting on the index would otherwise spend its timeout on that.
        wait_for(lambda: processors_joined(config), timeout=90, interval=0.5)
    except (RuntimeError, AssertionError) as exc:
        supervisor.down()
        pytest.fail(f"the test grid did not start: {exc}", pytrace=False)
    yield Grid(config, config_file, supervisor)
    if os.environ.get("DICOMGRID_TEST_KEEP_GRID") != "1":
        supervisor.down()
        shutil.rmtree(supervisor.run_dir, ignore_errors=True)
        delete_topics(config.kafka)
        drop_keyspace(cluster, config.cassandra.keyspace)


@pytest.fixture
def metadata_dc1(grid: Grid) -> Iterator[IndexReader]:
    store = grid.metadata("dc1")
    yield store
    store.db.close()


@pytest.fixture
def metadata_dc2(grid: Grid) -> Iterator[IndexReader]:
    store = grid.metadata("dc2")
    yield store
    store.db.close()


@pytest.fixture
def taps(grid: Grid) -> Iterator[Callable[..., EventTap]]:
    """Opens taps on a topic of the grid (or of another grid, given its ``config``) from its current end;
    every tap is closed after the test."""
    opened: list[EventTap] = []

    def open_tap(topic: str = schemas.TOPIC_INSTANCE_STORED, config: GridConfig | None = None,
                 from_start: bool = False) -> EventTap:
        tap = EventTap(config or grid.config, topic, from_start=from_start)
        opened.append(tap)
        return tap

    yield open_tap
    for tap in opened:
        tap.close()


@pytest.fixture
def publishers() -> Iterator[Callable[..., EventPublisher]]:
    """Makes event publishers for a test; each is flushed and its client destroyed after the test."""
    made: list[EventPublisher] = []

    def make(config: KafkaConfig, client_id: str) -> EventPublisher:
        publisher = EventPublisher(config, client_id=client_id)
        made.append(publisher)
        return publisher

    yield make
    for publisher in made:
        publisher.close()
