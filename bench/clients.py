"""Running DCMTK's query/retrieve clients (findscu, getscu) against a target, timed."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from bench.storescu import dcmtk_env
from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool


@dataclass(frozen=True)
class ClientRun:
    seconds: float
    code: int
    errors: list[str]  # E:/F: lines of the client's log


def run_client(argv: list[str], timeout: float = 600.0) -> ClientRun:
    """Run DCMTK's ``argv[0]`` (named bare in ``argv``, as the reports show it)."""
    tool, *args = argv
    started = time.monotonic()
    out = subprocess.run([require_dcmtk_tool(tool), *args], capture_output=True, text=True, env=dcmtk_env(),
                         timeout=timeout)
    seconds = time.monotonic() - started
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("E:", "F:"))]
    return ClientRun(seconds, out.returncode, errors)


def probe(argv: list[str]) -> str | None:
    """Run a client once; None if it succeeded, else what went wrong (for "not yet available")."""
    try:
        run = run_client(argv, timeout=60)
    except subprocess.TimeoutExpired:
        return f"`{argv[0]}` timed out"
    if run.code == 0 and not run.errors:
        return None
    return f"`{argv[0]}` against the grid: exit {run.code}" + (f", {run.errors[0]}" if run.errors else "")
