"""Keep patient data out of the service logs: a structlog processor that redacts PHI from every record.

The audit trail (dicom.audit, the audit tables) is where identities are kept; the service logs are read
by operators, shipped to log stores and attached to tickets, so by default they carry no patient data.
What is redacted, in every record (the grid's own and those of libraries logging through stdlib):

* the value of any key that names a PHI-bearing attribute or carries query keys, whatever its case or
  spelling (``PatientName``, ``patient_name``, ``00100010``, ``query_string``, ``identifier`` ...),
  nested dicts and lists included;
* inside free text (the message, ``error``, ``reason``, ``comment`` and the like, which may hold an
  exception's message or a sender's value): ``Keyword=value`` pairs of those attributes (a URL's
  query string, a C-FIND key as DCMTK writes it) and quoted literals, which is how pydicom and the
  grid's own messages quote a value (UIDs and numbers stay: they name no one and are needed to debug);
* in path-valued keys (``path``, ``file`` ...), every component but the last, whose stem is kept only
  when it is a digest or a number (the blob store's names), so a sender's folder ``DOE_JANE/`` is not.

It is on unless ``[logs] redact_phi = false`` (for debugging on a system without real patients).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[redacted]"

# PS3.15 Annex E attributes that identify a patient, plus the grid's own names for query keys. Compared
# lower-cased without "_" or "-", so PatientName, patient_name and patient-name are one key.
_PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientAddress",
    "PatientMotherBirthName", "PatientTelephoneNumbers", "PatientAge", "PatientWeight", "PatientSize",
    "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence", "IssuerOfPatientID", "MedicalRecordLocator",
    "AccessionNumber", "StudyID", "StudyDescription", "SeriesDescription", "ReferringPhysicianName",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "RequestingPhysician",
    "InstitutionName", "InstitutionAddress", "AdditionalPatientHistory", "PatientComments", "ImageComments",
    "EthnicGroup", "Occupation", "MilitaryRank", "BranchOfService", "CountryOfResidence", "RegionOfResidence",
)
_PHI_TAGS = ("00100010", "00100020", "00100030", "00100032", "00101005", "00101040", "00101060", "00102154",
             "00101010", "00101020", "00101030", "00101000", "00101001", "00101002", "00100021", "00080050",
             "00200010", "00081030", "0008103E", "00080090", "00081050", "00081060", "00081070", "00321032",
             "00080080", "00080081", "001021B0", "00104000", "00204000")
_GRID_KEYS = (
    "patient", "patients", "patient_ids", "birth_date", "accession", "query", "query_string", "querystring",
    "keys", "identifier", "params", "query_params", "matching_values", "values", "value", "text", "free_text",
)
PHI_KEYS = frozenset(k.lower().replace("_", "").replace("-", "") for k in (*_PHI_KEYWORDS, *_GRID_KEYS)) | {
    t.lower() for t in _PHI_TAGS}

# Free text: values inside are scrubbed, the text is kept.
TEXT_KEYS = frozenset({"event", "error", "reason", "comment", "detail", "message", "msg", "exception", "note",
                       "description", "outcome_description", "stack"})
PATH_KEYS = frozenset({"path", "paths", "file", "files", "filename", "source_path", "to", "spool", "directory"})

_KEYWORD_PAIR = re.compile(
    r"(?i)\b(" + "|".join(sorted({*_PHI_KEYWORDS, *_PHI_TAGS}, key=len, reverse=True))
    + r")\b([\"']?\s*[=:]\s*)(\[[^\]]*\]|\"[^\"]*\"|'[^']*'|[^&\s,;)'\"]*)")
# A data set dump, as DCMTK and pydicom print one: (0010,0010) PN [Doe^Jane] / (0010,0010) Patient's Name PN: 'Doe'
_DUMP_LINE = re.compile(
    r"(?i)(\((" + "|".join(f"{t[:4]},\\s*{t[4:]}" for t in _PHI_TAGS) + r")\)[^\[\n'\"]{0,60})(\[[^\]\n]*\]|'[^'\n]*'|\"[^\"\n]*\")")
# Quoted literals, not apostrophes inside words ("the site's").
_QUOTED = re.compile(r"(?<!\w)'([^'\n]{0,1024})'(?!\w)|(?<!\w)\"([^\"\n]{0,1024})\"(?!\w)")
_HARMLESS = re.compile(r"[0-9.+\-eE]*|[0-9a-fA-F]{8,}|\[redacted\]")
# Names the grid makes: digests (and their 2-character fan-out folders), numbers, <pid>-<hex> spool files.
_SAFE_STEM = re.compile(r"[0-9a-fA-F]{12,}|[0-9]+|[0-9a-f]{2}|[0-9]+-[0-9a-f]{8,}")
_KEYWORDS = frozenset(_PHI_KEYWORDS)
_REDACTED_PAIR = re.compile(r"\w+\s*[=:]\s*\[redacted\]")


def _normal(key: Any) -> str:
    return str(key).lower().replace("_", "").replace("-", "")


def is_phi_key(key: Any) -> bool:
    normal = _normal(key)
    return normal in PHI_KEYS or normal.strip("()").replace(",", "") in PHI_KEYS


def redact_text(text: str) -> str:
    """Free text with the values of PHI-bearing attributes and quoted literals (other than UIDs and
    numbers) replaced."""
    text = _KEYWORD_PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _DUMP_LINE.sub(lambda m: f"{m.group(1)}[{REDACTED}]", text)

    def quoted(m: re.Match[str]) -> str:
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        if _HARMLESS.fullmatch(inner) or inner in _KEYWORDS or _REDACTED_PAIR.fullmatch(inner):
            return m.group(0)
        quote = m.group(0)[0]
        return f"{quote}{REDACTED}{quote}"

    return _QUOTED.sub(quoted, text)


def redact_path(value: str) -> str:
    """A path with its folders, and a last name that is not a digest or a number, replaced."""
    if "/" not in value and "\\" not in value:
        stem = value.split(".", 1)[0]
        return value if _SAFE_STEM.fullmatch(stem) else REDACTED
    parts = re.split(r"[/\\]", value)
    last = parts[-1]
    stem = last.split(".", 1)[0]
    shown = last if _SAFE_STEM.fullmatch(stem) else REDACTED
    return f"{REDACTED}/{shown}"


def _redact(key: Any, value: Any, depth: int = 0) -> Any:
    if depth > 8:
        return REDACTED
    if is_phi_key(key):
        if value in (None, "", [], {}, ()):  # an empty key (a return key of a query) names no one
            return value
        return REDACTED
    if isinstance(value, str):
        normal = _normal(key)
        if normal in PATH_KEYS:
            return redact_path(value)
        if normal in TEXT_KEYS or depth > 0:
            return redact_text(value)
        return value
    if isinstance(value, Mapping):
        return {k: _redact(k, v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_redact(key, v, depth + 1) for v in value]
    return value


def redact_phi(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the record with PHI redacted (see the module docstring)."""
    for key, value in list(event_dict.items()):
        if key.startswith("_"):  # structlog's own bookkeeping (_record, _from_structlog)
            continue
        event_dict[key] = _redact(key, value)
    return event_dict
