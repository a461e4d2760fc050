"""The indexer: ``dicom.instance.stored`` -> Cassandra (patient/study/series/instance levels).

Delivery is at-least-once, so every row write is an idempotent upsert, and the indexer numbers versions
itself (:meth:`~dicomgrid.core.index_writer.IndexWriter.number_versions`). Events arrive validated
against their schema (:mod:`dicomgrid.processors.dead_letters`).

Study and series aggregates (instance counts, modalities and SOP classes in the study) are kept from
the batches: a study the indexer already holds in memory gets its counts moved on by the batch's new
instances (one write per partition, no read); a study it does not hold is read once from its rows
(``GROUP BY`` count, as a full recount), or starts empty when its ``instances`` partition was empty
before the batch. What it holds is only trusted while nothing else can write those studies: all of a
study's events are on one partition of the topic, consumed by one worker of the group, so the memory is
dropped when partitions are reassigned (:meth:`Indexer.forget`) and, for the studies of a batch, when
applying it fails. A batch that replaces a version, or moves an instance to another series or study,
has its study recounted from the rows.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from dicomgrid.core.index_writer import IndexWriter, Numbered, PartitionWrites, StudyAggregates
from dicomgrid.core.logging import get_logger

log = get_logger(__name__)

# Studies whose aggregates the indexer holds in memory (a few hundred bytes each).
STUDIES_HELD = 20_000


class Indexer:
    def __init__(self, writer: IndexWriter, held: int = STUDIES_HELD) -> None:
        self.writer = writer
        self._held = held
        self._studies: OrderedDict[str, StudyAggregates] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0
        # Studies recounted from their rows (a full partition read each), since the indexer started.
        self.recounts = 0

    def forget(self) -> None:
        """Drop every study held (partitions were reassigned: another worker may have indexed them)."""
        with self._lock:
            self._studies.clear()
            self._generation += 1

    def _drop(self, study_uids: Iterable[str]) -> None:
        with self._lock:
            for uid in study_uids:
                self._studies.pop(uid, None)

    def apply(self, events: list[dict[str, Any]]) -> int:
        """Index a batch of events; returns how many studies it touched."""
        if not events:
            return 0
        try:
            return self._apply(events)
        except BaseException:
            # Some rows of the batch may be written, and its retry finds them indexed: recount those
            # studies from the rows next time instead of moving on from what was held.
            self._drop({e["study"]["uid"] for e in events})
            raise

    def _apply(self, events: list[dict[str, Any]]) -> int:
        with self._lock:
            generation = self._generation
            held = {uid: self._studies.get(uid) for uid in dict.fromkeys(e["study"]["uid"] for e in events)}
        unknown = [uid for uid, state in held.items() if state is None]
        # Asked before the batch's rows are written: a study with no instance row yet starts empty.
        empty = self.writer.empty_studies(unknown) if unknown else set()
        numbering = self.writer.number_versions(events)
        writes = self.writer.index_writes(events, numbering)
        by_study: dict[str, list[Numbered]] = {}
        for item in numbering.numbered:
            by_study.setdefault(item.event["study"]["uid"], []).append(item)
        updated: dict[str, StudyAggregates] = {}
        recount: dict[str, list[Numbered]] = {}
        for uid, items in by_study.items():
            state = held.get(uid)
            if state is None and uid in empty:
                state = StudyAggregates()
            if state is None or not state.covers(items):
                recount[uid] = items
                continue
            state = state.copy()
            if state.add(items):
                # Moved on without a read: sent in the study's one request, with its instance rows.
                writes.add(uid, *self.writer.aggregate_writes(uid, state))
            updated[uid] = state
        self.writer.execute(writes)
        recounted = PartitionWrites()
        for uid, items in recount.items():
            # Recounted from the rows, so only once they are written, as every batch did before.
            replaced = any(i.replaced or i.moved for i in items)
            state = self.writer.read_study(uid, None if replaced else {i.event["instance"]["sop_class_uid"] for i in items})
            self.recounts += 1
            recounted.add(uid, *self.writer.aggregate_writes(uid, state, all_series=True))
            updated[uid] = state
        self.writer.execute(recounted)
        with self._lock:
            if generation == self._generation:
                for uid, state in updated.items():
                    state.written()
                    self._studies[uid] = state
                    self._studies.move_to_end(uid)
                while len(self._studies) > self._held:
                    self._studies.popitem(last=False)
        log.info("indexed", instances=len(events), studies=len(by_study))
        return len(by_study)
