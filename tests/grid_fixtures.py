"""Session fixtures for tests that need running grid services (receivers, DICOMweb, processors)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomgrid import schemas
from dicomgrid.core.config import GridConfig, SiteConfig
from dicomgrid.core.kafka import ensure_topics
from dicomgrid.core.metadata import MetadataStore, apply_schema
from dicomgrid.processors.app import skip_history
from dicomgrid.supervisor import Supervisor
from tests.grid import TEST_GRID_PREFIX, EventTap, load_test_config, write_test_config


@dataclass
class Grid:
    config: GridConfig
    config_file: Path
    supervisor: Supervisor

    def site(self, name: str) -> SiteConfig:
        return self.config.site(name)

    def tap(self, topic: str = schemas.TOPIC_INSTANCE_STORED) -> EventTap:
        return EventTap(self.config, topic)

    def metadata(self, dc: str) -> MetadataStore:
        return MetadataStore(self.config, local_dc=dc)


def _stop_orphaned_test_grids(cluster: GridConfig) -> None:
    """Stop the services of test grids whose pytest session died without cleaning up."""
    for run_dir in (cluster.root / "run" / "grid").glob(f"{TEST_GRID_PREFIX}*"):
        owner = run_dir.name.removeprefix(TEST_GRID_PREFIX)
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            Supervisor.stop_pid_files(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def grid(cluster: GridConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    """A two-site test grid with every service running, on the session's local cluster.

    Each session gets its own grid name (consumer group, pid files) and free ports, so sessions can
    run side by side on one cluster.
    """
    _stop_orphaned_test_grids(cluster)
    base = tmp_path_factory.mktemp("grid")
    name = f"{TEST_GRID_PREFIX}{os.getpid()}"
    config_file = write_test_config(base / "grid.toml", name, cluster.root, base / "sites")
    config = load_test_config(config_file)
    apply_schema(config)
    ensure_topics(config.kafka)
    # Index only what the tests send, not the history of a long-lived development cluster.
    skip_history(config)
    supervisor = Supervisor(config, str(config_file))
    try:
        supervisor.up(timeout=90)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield Grid(config, config_file, supervisor)
    if os.environ.get("DICOMGRID_TEST_KEEP_GRID") != "1":
        supervisor.down()
        shutil.rmtree(supervisor.run_dir, ignore_errors=True)


@pytest.fixture
def metadata_dc1(grid: Grid) -> Iterator[MetadataStore]:
    store = grid.metadata("dc1")
    yield store
    store.close()


@pytest.fixture
def metadata_dc2(grid: Grid) -> Iterator[MetadataStore]:
    store = grid.metadata("dc2")
    yield store
    store.close()
