"""DICOM UID checks for sender-supplied identifiers (PS3.5 9.1)."""

from __future__ import annotations

import re

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def is_valid_uid(value: object) -> bool:
    """True for a well-formed UID: digits and dots, <= 64 chars, no empty or zero-padded component.

    Many archives meet UIDs with a leading zero in a component ("1.2.04"); they are invalid per PS3.5
    and refused here, because every component of the grid (paths aside) keys on UIDs verbatim.
    """
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None
