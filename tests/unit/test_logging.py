"""Service logs survive restarts: appended, rotated by size, never truncated."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomgrid.core.daemon import Daemon
from dicomgrid.core.logging import configure_logging, get_logger


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = handlers, level


def test_a_restarted_service_appends_to_its_log_and_rotation_keeps_n_files(tmp_path: Path, restore_logging):
    log_file = tmp_path / "logs" / "grid-A-receiver-1.log"
    for run in range(2):  # a service, then the same service restarted
        configure_logging("INFO", log_file=log_file, max_bytes=64 * 1024, backups=3)
        get_logger("test").info("started", run=run)
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [(r["event"], r["run"]) for r in lines] == [("started", 0), ("started", 1)]

    for i in range(2000):
        get_logger("test").info("busy", i=i, padding="x" * 100)
    kept = sorted(p.name for p in log_file.parent.iterdir())
    assert kept == ["grid-A-receiver-1.log", "grid-A-receiver-1.log.1", "grid-A-receiver-1.log.2",
                    "grid-A-receiver-1.log.3"]
    assert all(p.stat().st_size <= 64 * 1024 for p in log_file.parent.iterdir())
    newest = json.loads(log_file.read_text().splitlines()[-1])
    assert newest["i"] == 1999


def test_console_output_is_appended_across_starts_and_rotated_when_large(tmp_path: Path):
    daemon = Daemon("echo", tmp_path / "echo.pid", tmp_path / "echo.log", tmp_path / "echo.out",
                    out_max_bytes=64 * 1024, out_backups=2)
    for run in range(2):
        daemon.start([sys.executable, "-c", f"print('run {run}')"], cwd=tmp_path).wait()
    assert daemon.out_file.read_text() == "run 0\nrun 1\n"
    daemon.out_file.write_text("x" * (64 * 1024))
    daemon.start([sys.executable, "-c", "print('run 2')"], cwd=tmp_path).wait()
    assert daemon.out_file.read_text() == "run 2\n"
    assert (tmp_path / "echo.out.1").read_text() == "x" * (64 * 1024)
