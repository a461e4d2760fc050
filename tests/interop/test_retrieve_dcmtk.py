"""Retrieve with real third-party peers: DCMTK movescu/getscu/storescp and Orthanc.

The move destinations are the grid's configured ones (``grid.config.remote_aes``): STORESCP on its
shipped port, ORTHANC on a free port of the test config. A peer is started by the test on that port; if
something else already listens there the test is skipped rather than talking to a stranger.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]

from dicomgrid.core.dicomfile import split_file_meta
from dicomgrid.deploy.local.dcmtk import dcmtk_tool
from tests.grid import free_port, wait_for
from tests.integration.test_retrieve import (
    Study,
    assert_identical,
    data_set_bytes,
    generated_study,
    mixed_study,
    store_and_index,
)

pytestmark = [pytest.mark.interop, pytest.mark.cluster]

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
DEFLATED = "1.2.840.10008.1.2.1.99"


def _installed(tool: str, path: str | None) -> str:
    if path is None:
        pytest.skip(f"{tool} is not installed (make setup installs DCMTK and Orthanc)")
    return path


def _require(tool: str) -> str:
    """DCMTK's ``tool``, never pynetdicom's script of the same name ahead of it on PATH."""
    return _installed(tool, dcmtk_tool(tool))


def _port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            pytest.skip(f"something already listens on {host}:{port}; not sending studies to it")


def _wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    def listening() -> bool:
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        with socket.socket() as probe:
            return probe.connect_ex((host, port)) == 0

    wait_for(listening, timeout=timeout, interval=0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)


def received_data_sets(directory: Path) -> dict[str, bytes]:
    """SOP Instance UID -> data set bytes of every file a DCMTK tool wrote (``+B``: exactly as received)."""
    out = {}
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            meta, _ = split_file_meta(io.BytesIO(data))
            out[str(meta.MediaStorageSOPInstanceUID)] = data_set_bytes(data)
    return out


def study_keys(study_uid: str) -> list[str]:
    return ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]


@pytest.fixture(scope="module")
def mixed(grid) -> Study:
    study = mixed_study()
    store_and_index(grid, study)
    return study


@pytest.fixture(scope="module")
def explicit(grid) -> Study:
    study = generated_study(6, pixel_bytes=4096)
    store_and_index(grid, study)
    return study


@pytest.fixture
def storescp(grid, tmp_path: Path) -> Iterator[Path]:
    """DCMTK storescp as the configured move destination STORESCP; yields its output folder."""
    tool = _require("storescp")
    peer = grid.config.remote_aes["STORESCP"]
    _port_free(peer.host, peer.port)
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [tool, "-aet", "STORESCP", "+xa", "+B", "-od", str(out), "-fe", ".dcm", str(peer.port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(peer.host, peer.port, proc)
        yield out
    finally:
        _stop(proc)


def test_movescu_to_storescp_mixed_syntaxes_byte_identical(grid, mixed, storescp):
    site = grid.site("A")
    result = _run([_require("movescu"), "-S", "-aet", "MOVESCU", "-aec", site.ae_title, "-aem", "STORESCP",
                   *study_keys(mixed.uid), site.dicom_host, str(site.dicom_port)])
    assert result.returncode == 0, result.stderr
    received = wait_for(lambda: (r := received_data_sets(storescp)) and len(r) == len(mixed.instances) and r,
                        timeout=30)
    assert_identical(mixed, received)


def test_movescu_unknown_destination_is_a801(grid, mixed):
    site = grid.site("A")
    result = _run([_require("movescu"), "-v", "-S", "-aet", "MOVESCU", "-aec", site.ae_title, "-aem", "NOWHERE",
                   *study_keys(mixed.uid), site.dicom_host, str(site.dicom_port)])
    output = result.stdout + result.stderr
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in output, output


@pytest.mark.parametrize("site_name", ["A", "B"])
def test_getscu_against_both_sites(grid, explicit, tmp_path, site_name):
    site = grid.site(site_name)
    out = tmp_path / "getscu"
    out.mkdir()
    result = _run([_require("getscu"), "-S", "-aet", "GETSCU", "-aec", site.ae_title, "+B", "-od", str(out),
                   *study_keys(explicit.uid), site.dicom_host, str(site.dicom_port)])
    assert result.returncode == 0, result.stderr
    assert_identical(explicit, received_data_sets(out))


def test_getscu_bad_identifier_fails_cleanly(grid, explicit, tmp_path):
    site = grid.site("A")
    out = tmp_path / "getscu"
    out.mkdir()
    result = _run([_require("getscu"), "-v", "-S", "-aet", "GETSCU", "-aec", site.ae_title, "-od", str(out),
                   "-k", "QueryRetrieveLevel=FRAME", "-k", f"StudyInstanceUID={explicit.uid}",
                   site.dicom_host, str(site.dicom_port)])
    output = result.stdout + result.stderr
    assert "C-GET Response (Error: DataSetDoesNotMatchSOPClass)" in output, output  # DCMTK's name for 0xA900
    assert not any(out.iterdir())


# -- Orthanc as a real peer -------------------------------------------------------------------------


class Orthanc:
    def __init__(self, http_port: int) -> None:
        self.url = f"http://127.0.0.1:{http_port}"

    def get(self, path: str) -> object:
        response = httpx.get(self.url + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: object) -> object:
        response = httpx.post(self.url + path, json=body, timeout=120)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def orthanc(grid, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc as the configured move destination ORTHANC, knowing site A as modality "grid"."""
    tool = _installed("Orthanc", shutil.which("Orthanc"))
    peer = grid.config.remote_aes["ORTHANC"]
    _port_free(peer.host, peer.port)
    base = tmp_path_factory.mktemp("orthanc")
    site = grid.site("A")
    http_port = free_port()
    config = {
        "Name": "dicomgrid-interop",
        "DicomAet": "ORTHANC",
        "DicomPort": peer.port,
        "HttpPort": http_port,
        "StorageDirectory": str(base / "storage"),
        "IndexDirectory": str(base / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomModalities": {"grid": [site.ae_title, site.dicom_host, site.dicom_port]},
    }
    (base / "orthanc.json").write_text(json.dumps(config))
    log = (base / "orthanc.log").open("wb")
    proc = subprocess.Popen([tool, str(base / "orthanc.json")], env=DCMTK_ENV, stdout=log, stderr=log)
    try:
        _wait_listening("127.0.0.1", http_port, proc)
        _wait_listening(peer.host, peer.port, proc)
        yield Orthanc(http_port)
    finally:
        _stop(proc)
        log.close()


def _orthanc_instances(orthanc: Orthanc, study: Study) -> dict[str, bytes]:
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study.uid}})
    out = {}
    for instance_id in found:  # type: ignore[union-attr]
        tags = orthanc.get(f"/instances/{instance_id}/simplified-tags")
        data = httpx.get(f"{orthanc.url}/instances/{instance_id}/file", timeout=30).content
        out[tags["SOPInstanceUID"]] = data_set_bytes(data)  # type: ignore[index]
    return out


def test_grid_moves_a_study_into_orthanc(grid, mixed, orthanc):
    site = grid.site("B")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = mixed.uid
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(site.dicom_host, site.dicom_port, ae_title=site.ae_title)
    assert assoc.is_established
    try:
        statuses = [s for s, _ in assoc.send_c_move(identifier, "ORTHANC", StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    assert statuses[-1].Status == 0x0000, statuses[-1]
    received = _orthanc_instances(orthanc, mixed)
    assert set(received) == set(mixed.by_uid())
    # Orthanc keeps data sets as received, except that it deflates a deflated one anew when it writes it.
    for uid, sent in mixed.by_uid().items():
        if sent.transfer_syntax == DEFLATED:
            assert zlib.decompress(received[uid], -zlib.MAX_WBITS) == zlib.decompress(sent.data_set, -zlib.MAX_WBITS)
        else:
            assert received[uid] == sent.data_set, uid


def test_orthanc_queries_and_retrieves_from_the_grid(grid, orthanc):
    """Orthanc's own query/retrieve: C-FIND to site A, then C-MOVE with itself as the destination."""
    study = generated_study(3)
    store_and_index(grid, study)
    query = orthanc.post("/modalities/grid/query", {"Level": "Study", "Query": {"StudyInstanceUID": study.uid}})
    answers = orthanc.get(f"{query['Path']}/answers")  # type: ignore[index]
    assert len(answers) == 1  # type: ignore[arg-type]
    orthanc.post(f"{query['Path']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})  # type: ignore[index]
    assert_identical(study, _orthanc_instances(orthanc, study))
