"""A stopped Cassandra datacenter is reported clearly, and ``up()`` brings it back."""

from __future__ import annotations

import pytest

from dicomgrid.core.config import GridConfig
from dicomgrid.deploy.local import LocalCluster
from tests.grid import dc_serves, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.fault]


def test_stopped_dc2_is_reported_down_and_up_restores_it(cluster: GridConfig, grid):
    if cluster.infra.cassandra_dcs < 2:
        pytest.skip("needs two datacenters")
    local = LocalCluster(cluster)
    local.stop_node("cassandra-dc2")
    try:
        status = local.status()
        dc2 = status.component("cassandra-dc2")
        assert not dc2.healthy
        assert dc2.pid is None
        assert dc2.detail == "no process"
        assert status.component("cassandra-dc1").healthy
        assert status.component("kafka").healthy
        assert not status.healthy
        dc2_line = next(line for line in status.render().splitlines() if line.startswith("cassandra-dc2"))
        assert "DOWN" in dc2_line and "no process" in dc2_line
    finally:
        status = local.up()
    assert status.healthy, status.render()
    assert status.component("cassandra-dc2").pid is not None
    # Restored means serving the grid's keyspace in dc2 again, which the tests after this one need.
    wait_for(lambda: dc_serves(grid.config, "dc2"), timeout=60, interval=0.5)
