"""The supervisor's view of the running test grid: receivers answer C-ECHO, the HTTP service /health/live;
services stopped on purpose stay stopped."""

from __future__ import annotations

import time

import pytest

from dicomgrid.supervisor import POLL_INTERVAL_S

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


def test_a_service_stopped_on_purpose_stays_down_until_up(grid):
    """The supervisor restarts what exits, but not what was stopped with stop_service; `up` brings it back."""
    service = next(s for s in grid.supervisor.services() if s.name == "B/http")
    restarts = next(s for s in grid.supervisor.status() if s.service.name == "B/http").restarts
    grid.supervisor.stop_service(service, 30)
    try:
        time.sleep(5 * POLL_INTERVAL_S)  # several rounds of the supervisor's loop
        stopped = next(s for s in grid.supervisor.status() if s.service.name == "B/http")
        assert not stopped.running and "stopped on request" in stopped.detail
    finally:
        grid.supervisor.up(timeout=60)
    back = next(s for s in grid.supervisor.status() if s.service.name == "B/http")
    assert back.healthy and back.restarts == restarts, "started again, not counted as a restart"
