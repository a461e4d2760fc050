"""Fixtures of the interop tests: a real Orthanc next to the test grid, and an indexer that has caught up."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from dicomgrid.core.config import SiteConfig
from tests.grid import committed_lag, free_port, wait_for

ORTHANC_BINARY = "/usr/sbin/Orthanc"
ORTHANC_AET = "ORTHANC"
GRID_MODALITY = "grid"


@pytest.fixture
def indexer_caught_up(grid) -> None:
    """Wait until the test grid's indexer has committed every event published before the test."""
    wait_for(lambda: committed_lag(grid.config) == 0, timeout=180, interval=1.0)


@dataclass(frozen=True)
class Orthanc:
    url: str  # REST API
    aet: str
    dicom_port: int
    grid_modality: str  # Orthanc's id for site A in its DicomModalities
    log: Path


def _orthanc_config(workdir: Path, http_port: int, dicom_port: int, grid_site: SiteConfig) -> dict:
    return {
        "Name": "dicomgrid-interop",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomModalities": {GRID_MODALITY: [grid_site.ae_title, grid_site.dicom_host, grid_site.dicom_port]},
        # Release the association to the grid as soon as a push is done, rather than keeping it idle.
        "DicomAssociationCloseDelay": 0,
    }


@pytest.fixture(scope="module")
def orthanc(grid, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """An Orthanc on loopback with its own storage, knowing site A as modality "grid".

    Its DICOM port is the grid's ``remote_aes`` entry for ORTHANC (a free port of the test config), where
    the grid sends C-MOVE sub-operations and Storage Commitment reports; its HTTP port is free.
    """
    workdir = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = free_port(), grid.config.remote_aes[ORTHANC_AET].port
    config_file = workdir / "orthanc.json"
    config_file.write_text(json.dumps(_orthanc_config(workdir, http_port, dicom_port, grid.site("A")), indent=2))
    log = workdir / "orthanc.log"
    with log.open("wb") as out:
        # TCP_NODELAY=1: Orthanc's DICOM layer is DCMTK, which otherwise waits on delayed ACKs.
        process = subprocess.Popen(
            [ORTHANC_BINARY, str(config_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    url = f"http://127.0.0.1:{http_port}"

    def ready() -> bool:
        assert process.poll() is None, f"Orthanc exited ({process.returncode}); see {log}"
        try:
            return httpx.get(f"{url}/system", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=30, interval=0.2)
        yield Orthanc(url, ORTHANC_AET, dicom_port, GRID_MODALITY, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
