"""The supervisor's view of the running test grid: receivers answer C-ECHO, the HTTP service /health."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.cluster]


def test_every_service_of_the_grid_is_healthy_and_probes_leave_no_trace(grid):
    receiver_logs = [
        grid.supervisor.daemon(s).log_file for s in grid.supervisor.services() if s.kind == "receiver"
    ]
    sizes = [log.stat().st_size for log in receiver_logs]
    for _ in range(3):
        statuses = grid.supervisor.status()
        assert all(s.healthy for s in statuses), [(s.service.name, s.detail) for s in statuses if not s.healthy]
    receivers = [s for s in statuses if s.service.kind == "receiver"]
    assert receivers and all(s.detail.startswith("dicom://GRID_") for s in receivers)
    # Probes are released associations the receivers do not log about.
    assert [log.stat().st_size for log in receiver_logs] == sizes
