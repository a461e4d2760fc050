"""No patient data in the service logs by default: the redacting processor of the logging setup."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomgrid.core.config import load_config
from dicomgrid.core.logging import configure_logging, get_logger
from dicomgrid.core.redact import REDACTED, redact_path, redact_phi, redact_text

NAME, PID, BIRTH, ACCESSION = "Doe^Johanna", "PID-7734", "19610417", "ACC-99812"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level = handlers, level


def logged(tmp_path: Path, redact: bool = True) -> str:
    log_file = tmp_path / "service.log"
    configure_logging("INFO", log_file=log_file, redact_phi=redact)
    log = get_logger("test.redact")
    # What a careless call site could pass: query keys, an identifier, a refused value, a sender's path.
    log.info("c-find", PatientName=NAME, patient_id=PID, matching_keys=["PatientName", "PatientID"],
             keys={"PatientBirthDate": BIRTH, "AccessionNumber": ACCESSION, "Modality": "CT"})
    log.warning("instance refused", reason=f"cannot decode data set: ValueError: invalid PN value '{NAME}'",
                path=f"/import/{NAME.replace('^', '_')}/{PID}.dcm", sop_instance_uid="1.2.3.4")
    log.warning("qido-rs", error=f"GET /dicomweb/studies?PatientName={NAME}&PatientID={PID}&limit=10")
    log.info("identifier", identifier={"00100010": {"vr": "PN", "Value": [{"Alphabetic": NAME}]}})
    logging.getLogger("somelibrary").warning("dataset: (0010,0020) LO [%s] and %s", PID, f"AccessionNumber={ACCESSION}")
    return log_file.read_text()


def test_a_log_line_with_patient_query_keys_carries_no_phi(tmp_path: Path, restore_logging):
    text = logged(tmp_path)
    for value in (NAME, "Johanna", PID, BIRTH, ACCESSION, "Doe_Johanna"):
        assert value not in text, value
    records = [json.loads(line) for line in text.splitlines()]
    first = records[0]
    assert first["PatientName"] == REDACTED and first["patient_id"] == REDACTED and first["keys"] == REDACTED
    # What is not patient data stays, so the log is still useful: keys matched on, UIDs, the message.
    assert first["matching_keys"] == ["PatientName", "PatientID"] and first["event"] == "c-find"
    assert records[1]["sop_instance_uid"] == "1.2.3.4" and records[1]["reason"].startswith("cannot decode")
    assert "limit=10" in records[2]["error"]


def test_redaction_can_be_turned_off_for_debugging(tmp_path: Path, restore_logging):
    assert NAME in logged(tmp_path, redact=False)


def test_redaction_is_on_in_the_shipped_config():
    assert load_config().logs.redact_phi is True


def test_free_text_keeps_uids_numbers_and_ordinary_words():
    assert redact_text("SOPInstanceUID in data set ('1.2.3') != request ('1.2.4')") == (
        "SOPInstanceUID in data set ('1.2.3') != request ('1.2.4')")
    assert redact_text("the site's copy and the peer's copy") == "the site's copy and the peer's copy"
    assert redact_text("PatientID: X1, limit=3") == f"PatientID: {REDACTED}, limit=3"
    assert redact_text("00100010=Doe") == f"00100010={REDACTED}"


def test_paths_keep_only_names_the_grid_makes():
    digest = "ab" * 32
    assert redact_path(f"/srv/grid/sites/A/blobs/sha256/ab/ab/{digest}") == f"{REDACTED}/{digest}"
    assert redact_path("/import/DOE_JANE/scan.dcm") == f"{REDACTED}/{REDACTED}"


def test_empty_return_keys_are_left_alone_and_private_keys_untouched():
    event = redact_phi(None, "info", {"event": "x", "PatientName": "", "_record": object(), "count": 3})
    assert event["PatientName"] == "" and event["count"] == 3
