"""`dicomgrid export parquet DIR`: the Parquet sink's instances dataset, written on demand from the index.

The same columns and the same hive partitioning (date, modality, site) as the sink's, so the two can be
read together or compared; the index holds the newest version of each instance (the sink has a row per
version received).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from dicomgrid.consumers.parquet_sink import INSTANCES, _part
from dicomgrid.core.index_reader import IndexReader

BATCH = 5000
PARTITIONS = pa.schema([("date", pa.string()), ("modality", pa.string()), ("site", pa.string())])


def _rows(index: IndexReader, since: dt.datetime | None) -> Any:
    series_cache: dict[str, dict[str, Any]] = {}
    study_cache: dict[str, Any] = {}
    for row in index.all_instances():
        received = row.received_at.replace(tzinfo=dt.timezone.utc) if row.received_at else None
        if since is not None and (received is None or received < since):
            continue
        if row.study_uid not in series_cache:
            series_cache.clear()
            study_cache.clear()
            series_cache[row.study_uid] = {s.series_uid: s for s in index.series_of_study(row.study_uid)}
            study_cache[row.study_uid] = index.study(row.study_uid)
        series = series_cache[row.study_uid].get(row.series_uid)
        study = study_cache[row.study_uid]
        yield {
            "date": received.date().isoformat() if received else "none",
            "modality": _part(series.modality if series else None), "site": _part(row.received_site),
            "received_at": received, "study_uid": row.study_uid, "series_uid": row.series_uid,
            "sop_instance_uid": row.sop_instance_uid, "sop_class_uid": row.sop_class_uid,
            "transfer_syntax_uid": row.transfer_syntax_uid, "study_date": study.study_date if study else None,
            "body_part_examined": series.body_part_examined if series else None,
            "series_number": series.series_number if series else None, "instance_number": row.instance_number,
            "rows": row.rows, "columns": row.columns, "number_of_frames": row.number_of_frames, "size": row.size,
            "sha256": row.sha256, "version": row.version, "source_protocol": None, "calling_ae": None,
            "event_id": str(row.event_id) if row.event_id else None,
        }


def export_instances(index: IndexReader, directory: Path, since: dt.datetime | None = None,
                     on_progress: Callable[[int], None] = lambda n: None) -> int:
    """Write every indexed instance (received since ``since``) to ``directory/instances``; how many."""
    schema = pa.unify_schemas([PARTITIONS, INSTANCES])
    written = 0
    batches = []

    def flush() -> None:
        nonlocal batches
        if batches:
            pads.write_dataset(pa.Table.from_pylist(batches, schema=schema), directory / "instances", format="parquet",
                               partitioning=pads.partitioning(PARTITIONS, flavor="hive"),
                               existing_data_behavior="overwrite_or_ignore",
                               basename_template=f"export-{written}-{{i}}.parquet")
            batches = []

    for row in _rows(index, since):
        batches.append(row)
        written += 1
        if len(batches) >= BATCH:
            flush()
            on_progress(BATCH)
    pending = len(batches)
    flush()
    on_progress(pending)
    return written
