"""The machine a benchmark ran on, and waiting for it to be quiet before measuring.

Results on a 2-core machine shared with other engineers' test suites are only comparable when the load
at the start of each run is known, so it is recorded per run; the final measurement waits (bounded) for
the load to drop and for other grids' services to stop.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass

import psutil
from tqdm import tqdm

from bench.paths import BENCH_ROOT
from dicomgrid.deploy.local.dcmtk import dcmtk_tool


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return next((line.strip("$ ") for line in (out.stdout + out.stderr).splitlines() if line.strip()), "?")


def _storage() -> str:
    """The mount holding the benchmark's data, e.g. "ext4 on /dev/vda (/)"."""
    path = str(BENCH_ROOT.resolve() if BENCH_ROOT.exists() else BENCH_ROOT.parent.parent)
    mounts = sorted(psutil.disk_partitions(all=True), key=lambda m: len(m.mountpoint), reverse=True)
    mount = next((m for m in mounts if path == m.mountpoint or path.startswith(m.mountpoint.rstrip("/") + "/")), None)
    return f"{mount.fstype} on {mount.device} ({mount.mountpoint})" if mount else "?"


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cores_logical: int
    cores_physical: int | None
    ram_gib: float
    kernel: str
    os: str
    python: str
    java: str
    dcmtk: str
    storage: str  # file system and device under .dicomgrid/bench, where every target writes

    @classmethod
    def describe(cls) -> "Machine":
        os_release = platform.freedesktop_os_release().get("PRETTY_NAME", "?") if hasattr(
            platform, "freedesktop_os_release") else "?"
        return cls(
            cpu_model=_cpu_model(),
            cores_logical=psutil.cpu_count(logical=True) or 0,
            cores_physical=psutil.cpu_count(logical=False),
            ram_gib=round(psutil.virtual_memory().total / 2**30, 1),
            kernel=platform.release(),
            os=os_release,
            python=platform.python_version(),
            java=_first_line(["java", "-version"]),
            dcmtk=_first_line([storescu, "--version"]) if (storescu := dcmtk_tool("storescu")) else "not found",
            storage=_storage(),
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def other_grid_services(own_marker: str) -> int:
    """How many grid service processes run that are not the benchmark's own (test sessions, dev grid)."""
    count = 0
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "-m dicomgrid" in cmdline and " serve " in cmdline and own_marker not in cmdline:
            count += 1
    return count


@dataclass(frozen=True)
class Quiet:
    waited_s: float
    load_1m: float
    other_grid_services: int
    reached: bool


def wait_until_quiet(max_load: float, max_wait_s: float, own_marker: str) -> Quiet:
    """Poll until the 1-minute load is at most ``max_load`` and no other grid runs, for up to ``max_wait_s``."""
    started = time.monotonic()
    with tqdm(total=round(max_wait_s), desc="waiting for a quiet machine", unit="s", leave=False) as bar:
        while True:
            load, others = os.getloadavg()[0], other_grid_services(own_marker)
            waited = time.monotonic() - started
            if load <= max_load and others == 0:
                return Quiet(round(waited, 1), load, others, True)
            if waited >= max_wait_s:
                return Quiet(round(waited, 1), load, others, False)
            bar.set_postfix(load=f"{load:.2f}", other_grid_services=others)
            time.sleep(min(10.0, max_wait_s - waited))
            bar.update(round(time.monotonic() - started) - bar.n)
