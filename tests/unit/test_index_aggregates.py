"""The indexer's version numbering and study aggregates, against a counting stand-in for Cassandra."""

from __future__ import annotations

import datetime as dt

import pytest

from dicomgrid.core.index_writer import IndexWriter
from dicomgrid.processors.indexer import Indexer
from tests.unit.fake_index_db import fake_db, stored_event  # noqa: F401 (fixture)

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def at(ms: int) -> dt.datetime:
    return NOW + dt.timedelta(milliseconds=ms)


def corpus(n: int, studies: int) -> list[dict]:
    """The bench's small corpus shape: ``n`` instances in ``studies`` studies, sent study after study."""
    return [stored_event(f"1.2.{i * studies // n + 1}", f"1.3.{i * studies // n + 1}", f"1.4.{i}", at(i))
            for i in range(n)]


def recount(db, study: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for series, _ in db.instances[study].values():
        counts[series] = counts.get(series, 0) + 1
    return counts


def test_a_held_study_costs_no_partition_read_and_one_write_per_partition(fake_db):
    indexer = Indexer(IndexWriter(fake_db))
    events = corpus(500, 1)
    indexer.apply(events[:100])
    assert indexer.recounts == 0  # a new study starts empty: no GROUP BY
    before = fake_db.c.copy()
    indexer.apply(events[100:200])
    spent = fake_db.c - before
    # Instance rows: 3 table partitions per instance (versions, locations, replicas); the study's
    # instances, series and studies rows (levels and aggregates) one partition of each; the patient.
    assert spent["rows_read"] == 0
    assert spent["mutations"] <= 100 * 3 + 3 + 1
    assert spent["reads"] == 1  # the batch's versions, one IN request


def test_counts_moved_on_from_batches_equal_a_recount_and_survive_replays(fake_db):
    indexer = Indexer(IndexWriter(fake_db))
    events = corpus(300, 3)
    for start in range(0, 300, 40):
        indexer.apply(events[start:start + 40])
    indexer.apply(events[10:90])  # redelivery
    for study in ("1.2.1", "1.2.2", "1.2.3"):
        assert fake_db.series_counts[study] == recount(fake_db, study)
        assert fake_db.studies_counts[study] == (1, 100)


def test_reassignment_and_failures_make_the_indexer_recount(fake_db):
    indexer = Indexer(IndexWriter(fake_db))
    events = corpus(60, 1)
    indexer.apply(events[:20])
    indexer.forget()
    indexer.apply(events[20:40])
    assert indexer.recounts == 1
    assert fake_db.studies_counts["1.2.1"] == (1, 40)

    broken = stored_event("1.2.1", "1.3.1", "1.4.999", at(999))
    broken["payload"]["sha256"] = "not a digest"  # fails half-way through the batch's writes
    fake_db.fail_on = "not a digest"
    with pytest.raises(RuntimeError):
        indexer.apply(events[40:50] + [broken])
    fake_db.fail_on = None
    indexer.apply(events[40:60])
    assert indexer.recounts == 2
    assert fake_db.studies_counts["1.2.1"] == (1, 60)


def test_versions_follow_receive_order_whatever_the_arrival_order(fake_db):
    writer = IndexWriter(fake_db)
    indexer = Indexer(writer)
    first = stored_event("1.2.1", "1.3.1", "1.4.1", at(0), b"one")
    second = stored_event("1.2.1", "1.3.1", "1.4.1", at(1000), b"two")
    third = stored_event("1.2.1", "1.3.1", "1.4.1", at(2000), b"three")
    indexer.apply([third])
    indexer.apply([first])  # late: received before the one indexed
    indexer.apply([second, first])  # and a replay with it
    versions = {sha: row[2] for sha, row in fake_db.versions["1.4.1"].items()}
    assert versions == {first["payload"]["sha256"]: 1, second["payload"]["sha256"]: 2,
                        third["payload"]["sha256"]: 3}
    assert fake_db.studies_counts["1.2.1"] == (1, 1)
    # A resend of an indexed payload, later, keeps its number and receive time.
    again = stored_event("1.2.1", "1.3.1", "1.4.1", at(5000), b"one")
    numbered = writer.number_versions([again]).numbered
    assert (numbered[0].version, numbered[0].received, numbered[0].new_instance) == (1, at(0), False)
