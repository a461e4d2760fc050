"""Background services (stream processors, replication worker, sink) yield the CPU to the receive path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dicomgrid.core.config import SchedulingConfig, load_config

_PROBE = """
import os, sys
from dicomgrid.cli import Context, _in_background
before = os.nice(0)
_in_background(Context(sys.argv[1], None))
print(before, os.nice(0))
"""


@pytest.mark.parametrize("nice", [0, 3])
def test_a_background_service_applies_the_configured_nice_increment(tmp_path: Path, nice: int):
    path = tmp_path / "grid.toml"
    path.write_text(f'name = "nice"\ndata_dir = "{tmp_path}"\n[scheduling]\nbackground_nice = {nice}\n')
    assert load_config(path).scheduling.background_nice == nice
    # In a process of its own: a nice increment cannot be taken back without privileges.
    done = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert after == min(before + nice, 19)


@pytest.mark.parametrize("nice", [-1, 20])
def test_a_nice_increment_out_of_range_is_refused(nice: int):
    with pytest.raises(ValidationError):
        SchedulingConfig(background_nice=nice)


_AUTOGROUP_PROBE = """
import sys
from pathlib import Path
from dicomgrid.core.scheduling import lower_priority
lower_priority(int(sys.argv[1]))
print(Path("/proc/self/autogroup").read_text(), end="")
"""


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no autogroup scheduling here")
def test_a_background_service_leading_its_session_lowers_its_autogroup():
    """Under autogroup scheduling a nice value only weighs against the same session's processes, and
    every service runs in a session of its own: the session's group must yield, or nothing does."""
    done = subprocess.run([sys.executable, "-c", _AUTOGROUP_PROBE, "7"], capture_output=True, text=True,
                          timeout=60, start_new_session=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split("nice")[1]) >= 7


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no autogroup scheduling here")
def test_a_background_service_started_from_a_shell_leaves_the_shell_s_autogroup_alone():
    before = Path("/proc/self/autogroup").read_text()
    done = subprocess.run([sys.executable, "-c", _AUTOGROUP_PROBE, "7"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    # Outside any autogroup (a session of init's, a cgroup with a CPU weight) the kernel shows nothing.
    assert done.stdout == Path("/proc/self/autogroup").read_text() == before


def test_a_process_outside_any_autogroup_sets_its_nice_value_only(tmp_path: Path, monkeypatch, capsys):
    """The kernel shows an empty /proc/self/autogroup for a session of init's or a cgroup with its own
    CPU weight (a CI runner, a container): nothing to lower there, and nothing to warn about."""
    from dicomgrid.core import scheduling

    shown = tmp_path / "autogroup"
    shown.write_text("")
    niced = []
    monkeypatch.setattr(scheduling, "_AUTOGROUP", shown)
    monkeypatch.setattr(scheduling.os, "nice", lambda inc: niced.append(inc) or inc)
    monkeypatch.setattr(scheduling.os, "getsid", lambda pid: 4242)
    monkeypatch.setattr(scheduling.os, "getpid", lambda: 4242)
    scheduling.lower_priority(5)
    assert niced == [5]
    assert shown.read_text() == ""
    assert "not lowered" not in capsys.readouterr().out
