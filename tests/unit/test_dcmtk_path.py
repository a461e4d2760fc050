"""Finding DCMTK's tools when scripts of the same names (pynetdicom's, in an activated venv) come first on PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dicomgrid.deploy.local import dcmtk
from dicomgrid.deploy.local.dcmtk import dcmtk_tool, require_dcmtk_tool


@pytest.fixture(autouse=True)
def fresh_cache():
    dcmtk_tool.cache_clear()
    yield
    dcmtk_tool.cache_clear()


def _impostors(tmp_path: Path, name: str) -> list[Path]:
    """A Python script and a compiled program that is not DCMTK, both called ``name``."""
    script_dir, binary_dir = tmp_path / "venv-bin", tmp_path / "other-bin"
    script_dir.mkdir()
    binary_dir.mkdir()
    script = script_dir / name
    script.write_text("#!/usr/bin/env python3\nimport sys\nprint('storescu.py v0.3.0')\nsys.exit(0)\n")
    script.chmod(0o755)
    (binary_dir / name).symlink_to(shutil.which("true") or "/bin/true")
    return [script_dir, binary_dir]


def test_skips_scripts_and_other_programs_of_the_same_name(tmp_path: Path, monkeypatch):
    real = Path(dcmtk.SYSTEM_DIR, "storescu")
    if not real.exists():
        pytest.skip("DCMTK storescu is not installed")
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, [*_impostors(tmp_path, "storescu"), dcmtk.SYSTEM_DIR])))
    assert shutil.which("storescu") == str(tmp_path / "venv-bin" / "storescu")
    assert dcmtk_tool("storescu") == str(real)


def test_falls_back_to_the_system_dir_when_path_leaves_it_out(tmp_path: Path, monkeypatch):
    if not Path(dcmtk.SYSTEM_DIR, "findscu").exists():
        pytest.skip("DCMTK findscu is not installed")
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, _impostors(tmp_path, "findscu"))))
    assert dcmtk_tool("findscu") == str(Path(dcmtk.SYSTEM_DIR, "findscu"))


def test_none_when_only_impostors_exist(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, _impostors(tmp_path, "echoscu"))))
    monkeypatch.setattr(dcmtk, "SYSTEM_DIR", str(tmp_path / "empty"))
    assert dcmtk_tool("echoscu") is None
    with pytest.raises(FileNotFoundError, match="DCMTK echoscu"):
        require_dcmtk_tool("echoscu")
