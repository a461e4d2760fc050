"""Shared fixtures.

``cluster`` brings up the real local Kafka + Cassandra cluster once per session (reusing one that
already runs, so a warm session starts in a fraction of a second) and leaves it running for the next
session; set DICOMGRID_TEST_STOP_CLUSTER=1 to stop it at the end.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from confluent_kafka import Consumer, Producer
from pynetdicom import _config as pynetdicom_config

from dicomgrid.core.config import GridConfig, load_config

pytest_plugins = ["tests.grid_fixtures"]


@pytest.fixture
def pynetdicom_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a test that serves a site AE in its own process: the AE sets pynetdicom's process-wide
    storage and logging settings and the temporary folder (for the receiver's needs); they are put
    back afterwards, or this process's later DIMSE clients would receive their data sets as files."""
    for name in ("STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET", "LOG_HANDLER_LEVEL"):
        monkeypatch.setattr(pynetdicom_config, name, getattr(pynetdicom_config, name))
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)


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


KafkaClient = TypeVar("KafkaClient", Producer, Consumer)


@pytest.fixture
def kafka_clients() -> Iterator[Callable[[KafkaClient], KafkaClient]]:
    """Keeps the plain Kafka clients a test makes; after the test, producers are flushed and every client
    is closed, so none goes on reconnecting (and logging) once the run is over."""
    clients: list[Producer | Consumer] = []

    def keep(client: KafkaClient) -> KafkaClient:
        clients.append(client)
        return client

    yield keep
    for client in reversed(clients):
        if isinstance(client, Producer):
            with contextlib.suppress(RuntimeError):  # the test closed it already
                client.flush(10)
                client.purge()
        client.close()


# Cheapest and least disruptive first: fault tests stop real nodes, so they run last.
_SUITE_ORDER = {"unit": 0, "integration": 1, "interop": 2, "fault": 3}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def suite(item: pytest.Item) -> int:
        parts = item.path.parts
        return next((_SUITE_ORDER[p] for p in reversed(parts) if p in _SUITE_ORDER), len(_SUITE_ORDER))

    items.sort(key=suite)  # stable: keeps file and test order within a suite
