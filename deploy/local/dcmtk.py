"""DCMTK's command-line tools (storescu, findscu, storescp, ...): the real DICOM peers of the tests and benchmarks.

pynetdicom installs Python console scripts of the same names (storescu, findscu, echoscu, storescp, getscu,
movescu, ...) into the virtual environment's ``bin/``, which comes first on PATH once the environment is
activated. A bare name or ``shutil.which`` then runs pynetdicom's script, which takes other options and
behaves differently on the wire; so each tool is looked up on PATH skipping anything that is not DCMTK.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

# Where Debian's dcmtk package puts them: still found when PATH leaves it out.
SYSTEM_DIR = "/usr/bin"
# A DCMTK tool's --version output starts "$dcmtk: storescu v3.6.7 2022-04-22 $"; some builds name
# "OFFIS DCMTK" instead.
_BANNERS = ("$dcmtk:", "OFFIS DCMTK")


def _is_dcmtk(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            head = file.read(2)
    except OSError:
        return False
    # DCMTK's tools are compiled programs; a script of the same name (pynetdicom's) is never one of them,
    # and running it to ask would cost a Python start-up.
    if head == b"#!":
        return False
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return any(banner in done.stdout + done.stderr for banner in _BANNERS)


@functools.cache
def dcmtk_tool(name: str) -> str | None:
    """The absolute path of DCMTK's ``name`` (the first on PATH, else in /usr/bin), or None if not installed."""
    seen: set[str] = set()
    for directory in [*os.environ.get("PATH", os.defpath).split(os.pathsep), SYSTEM_DIR]:
        directory = os.path.abspath(directory or os.curdir)
        if directory in seen:
            continue
        seen.add(directory)
        candidate = shutil.which(name, path=directory)
        if candidate is not None and _is_dcmtk(candidate):
            return os.path.abspath(candidate)
    return None


def require_dcmtk_tool(name: str) -> str:
    """Like :func:`dcmtk_tool`, for callers that cannot go on without it."""
    path = dcmtk_tool(name)
    if path is None:
        raise FileNotFoundError(f"DCMTK {name} not found on PATH or in {SYSTEM_DIR}: install dcmtk (make setup)")
    return path
