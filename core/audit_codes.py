"""The coded values of DICOM audit messages (PS3.15 A.5, PS3.16 CID 400-405, IHE RAD transactions).

Events are named by their DICOM event name in the code (``"DICOM Instances Transferred"``); this module
gives each its EventID and, where one applies, its EventTypeCode.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    code: str
    system: str
    meaning: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "system": self.system, "meaning": self.meaning}


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# CID 400 Audit Event ID
EVENT_IDS: dict[str, Code] = {name: _dcm(code, name) for code, name in (
    ("110100", "Application Activity"),
    ("110101", "Audit Log Used"),
    ("110102", "Begin Transferring DICOM Instances"),
    ("110103", "DICOM Instances Accessed"),
    ("110104", "DICOM Instances Transferred"),
    ("110105", "DICOM Study Deleted"),
    ("110106", "Export"),
    ("110107", "Import"),
    ("110108", "Network Entry"),
    ("110112", "Query"),
    ("110113", "Security Alert"),
    ("110114", "User Authentication"),
)}
# Storage Commitment has no event of its own: it is reported as instances transferred (committed), with
# the IHE transaction as its type.
EVENT_IDS["Storage Commitment"] = EVENT_IDS["DICOM Instances Transferred"]

# CID 401 Audit Event Type Code, and the IHE transactions the grid's services implement.
EVENT_TYPES: dict[str, Code] = {
    **{name: _dcm(code, name) for code, name in (
        ("110120", "Application Start"),
        ("110121", "Application Stop"),
        ("110122", "Login"),
        ("110123", "Logout"),
        ("110126", "Node Authentication"),
        ("110129", "Security Configuration"),
        ("110132", "Use of Restricted Function"),
        ("110133", "Audit Recording Stopped"),
        ("110134", "Audit Recording Started"),
    )},
    "Modality Images Stored": Code("RAD-8", "IHE Transactions", "Modality Images Stored"),
    "Storage Commitment": Code("RAD-10", "IHE Transactions", "Storage Commitment"),
    "Query Images": Code("RAD-14", "IHE Transactions", "Query Images"),
    "Retrieve Images": Code("RAD-16", "IHE Transactions", "Retrieve Images"),
    "WADO Retrieve": Code("RAD-55", "IHE Transactions", "WADO Retrieve"),
    "WADO-RS Retrieve": Code("RAD-107", "IHE Transactions", "WADO-RS Retrieve"),
    "Store Instances over the Web": Code("RAD-108", "IHE Transactions", "Store Instances over the Web"),
}

# CID 402 Audit Active Participant Role ID Code
ROLE_IDS: dict[str, Code] = {name: _dcm(code, f"{name} Role ID" if name in ("Source", "Destination") else name)
                             for code, name in (
    ("110150", "Application"),
    ("110151", "Application Launcher"),
    ("110152", "Destination"),
    ("110153", "Source"),
    ("110154", "Destination Media"),
    ("110155", "Source Media"),
)}
# A requestor of a query or retrieve is the source of the request.
ROLE_IDS["Requestor"] = ROLE_IDS["Source"]

# CID 404 Audit Participant Object ID Type Code, and RFC 3881's patient number.
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
NODE_ID = _dcm("110182", "Node ID")
# The grid's own: a payload named by the SHA-256 of its bytes (a blob in a site's store).
PAYLOAD_DIGEST = Code("SHA256", "99DICOMGRID", "Payload SHA-256")
TRIAL = Code("TRIAL", "99DICOMGRID", "Clinical Trial")

# RFC 3881 / PS3.15 A.5.1.2: participant object type code, role and life cycle.
OBJECT_PERSON, OBJECT_SYSTEM = "1", "2"
ROLE_PATIENT, ROLE_REPORT, ROLE_RESOURCE, ROLE_DATA_DESTINATION, ROLE_QUERY = "1", "3", "4", "16", "24"
AUDIT_SOURCE_APPLICATION_SERVER = "4"
