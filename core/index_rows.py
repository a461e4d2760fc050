"""How index rows are keyed: the stable buckets of listings and typed study dates.

Shared by the indexer's writes (:mod:`dicomgrid.core.index_writer`) and the consumers' reads
(:mod:`dicomgrid.core.index_reader`), which must agree on both.
"""

from __future__ import annotations

import datetime as dt
import zlib

STUDY_BUCKETS = 32


def study_bucket(study_uid: str) -> int:
    """A stable bucket for listing studies page by page without scanning the table."""
    return zlib.crc32(study_uid.encode()) % STUDY_BUCKETS


def parse_da(value: str | None) -> dt.date | None:
    """A DICOM DA value (YYYYMMDD) as a date, or None when absent or malformed."""
    if not value or len(value) != 8 or not value.isdigit():
        return None
    try:
        return dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None

