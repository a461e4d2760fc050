"""Shared fixtures.

``cluster`` brings up the real local Kafka + Cassandra cluster once per session (reusing one that
already runs, so a warm session starts in a fraction of a second) and leaves it running for the next
session; set DICOMGRID_TEST_STOP_CLUSTER=1 to stop it at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dicomgrid.core.config import GridConfig, load_config

pytest_plugins = ["tests.grid_fixtures"]


@pytest.fixture(scope="session")
def cluster() -> Iterator[GridConfig]:
    """The grid config (``DICOMGRID_CONFIG`` and env honoured), with its local cluster healthy."""
    from dicomgrid.deploy.local import InfraError, LocalCluster

    config = load_config()
    local = LocalCluster(config)
    try:
        local.up()
    except InfraError as exc:
        pytest.fail(f"the local cluster did not come up: {exc}", pytrace=False)
    yield config
    if os.environ.get("DICOMGRID_TEST_STOP_CLUSTER") == "1":
        local.down()


# Cheapest and least disruptive first: fault tests stop real nodes, so they run last.
_SUITE_ORDER = {"unit": 0, "integration": 1, "interop": 2, "fault": 3}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def suite(item: pytest.Item) -> int:
        parts = item.path.parts
        return next((_SUITE_ORDER[p] for p in reversed(parts) if p in _SUITE_ORDER), len(_SUITE_ORDER))

    items.sort(key=suite)  # stable: keeps file and test order within a suite
