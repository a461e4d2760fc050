"""Keyed pseudonyms: the same original always maps to the same replacement under one trial key.

Every replacement is HMAC-SHA256 under the trial's key of the original value, with a label per kind of
value (so a Patient ID and a UID that happen to be equal do not share a pseudonym). Nothing is stored:
any site, any process, today or in a year, derives the same pseudonym from the same key, which is what
keeps a patient's studies linked across retrievals and sites, and references inside a data set
(Referenced SOP Instance UID, Frame of Reference UID, ...) pointing at the right pseudonymous instance.

Without the key the pseudonyms cannot be reversed or recomputed: an HMAC, unlike a plain hash, cannot be
checked against a dictionary of candidate names or IDs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

MIN_KEY_BYTES = 32
# Dates of one patient move back by a whole number of days in this range (1 to 10 years).
SHIFT_DAYS = (365, 3650)


class Pseudonyms:
    def __init__(self, key: bytes, prefix: str) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a trial key has at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self.prefix = prefix

    def digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, kind.encode() + b"\x00" + value.encode("utf-8"), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """``2.25.<n>`` where n is a UUID (RFC 9562 version 8, custom) made of the first 128 bits of the HMAC.

        The 2.25 arc is for UUIDs (ITU-T X.667), so the variant and version bits are set; the UID is at
        most 44 characters.
        """
        raw = bytearray(self.digest("uid", original.strip())[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80
        raw[8] = (raw[8] & 0x3F) | 0x80
        return f"2.25.{int.from_bytes(raw, 'big')}"

    def patient_id(self, original: str) -> str:
        return f"{self.prefix}-{self.digest('patient', original.strip()).hex()[:16].upper()}"

    def text(self, original: str, max_chars: int) -> str:
        """A dummy for a text value that must not be empty, consistent for the same original."""
        value = "ANON" + self.digest("text", original).hex().upper()
        return value[:max_chars]

    def day_shift(self, patient: str) -> int:
        """Days every date of this patient moves by (negative): the same for all of the patient's studies."""
        low, high = SHIFT_DAYS
        n = int.from_bytes(self.digest("date-shift", patient)[:8], "big")
        return -(low + n % (high - low + 1))

    def shift_date(self, value: str, days: int) -> str | None:
        """A DA value (YYYYMMDD) moved by ``days``; None if it is not a full date."""
        try:
            day = dt.date(int(value[0:4]), int(value[4:6]), int(value[6:8])) if len(value) == 8 else None
        except ValueError:
            day = None
        if day is None:
            return None
        try:
            return (day + dt.timedelta(days=days)).strftime("%Y%m%d")
        except OverflowError:
            return None

    def fingerprint(self) -> str:
        """Identifies the key (to compare grids sharing a trial) without revealing it."""
        return self.digest("fingerprint", "").hex()[:16]
