"""The benchmark harness's pure helpers: multipart counting, the seeded scale set, percentiles, the
replication sections' rates, lags, medians and profile breakdown."""

from __future__ import annotations

import io
import json

import pytest
from pydicom import dcmread

from bench import retired
from bench.backlog import BacklogRun, median_row, summarize_replicator
from bench.history import FALLBACK_RATES, full_runs, ingest_rates
from bench.replication import answer_times, replica_lags
from bench.scale_set import ScaleSet, queries
from bench.stats import percentile, summary
from bench.wado import PartCounter, boundary_of


def _multipart(boundary: str, parts: list[bytes]) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts)
    return body + b"--" + boundary.encode() + b"--\r\n"


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10_000])
def test_part_counter_counts_parts_whatever_the_chunking(chunk: int) -> None:
    body = _multipart("b0undary", [b"\x00" * 100, b"DICM" * 50, b""])
    counter = PartCounter("b0undary")
    for start in range(0, len(body), chunk):
        counter.feed(body[start:start + chunk])
    assert counter.parts == 3


def test_boundary_of_reads_quoted_and_bare_boundaries() -> None:
    assert boundary_of('multipart/related; type="application/dicom"; boundary=abc') == "abc"
    assert boundary_of('multipart/related; boundary="x-y"; type="application/dicom"') == "x-y"
    with pytest.raises(ValueError):
        boundary_of("application/dicom")


def test_scale_set_is_a_seeded_prefix_stream() -> None:
    scale = ScaleSet(50, seed=3)
    whole = list(scale.items())
    assert [s.index for s in whole] == list(range(50))
    assert list(scale.items(20)) == whole[20:]
    again = list(ScaleSet(50, seed=3).items())
    assert [(s.study_uid, s.patient_id, s.study_date) for s in again] == \
        [(s.study_uid, s.patient_id, s.study_date) for s in whole]
    assert len({s.study_uid for s in whole}) == 50
    study = whole[7]
    assert study.event()["event_id"] == again[7].event()["event_id"]  # a resumed load upserts the same rows


def test_scale_study_is_the_same_in_both_archives() -> None:
    study = next(ScaleSet(10).items(4))
    event, ds = study.event(), dcmread(io.BytesIO(study.dicom()))
    assert (ds.PatientID, ds.StudyDate, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == (
        event["patient"]["id"], event["study"]["date"], event["study"]["uid"], event["series"]["uid"],
        event["instance"]["sop_instance_uid"])


def test_scale_queries_are_the_same_list_every_time() -> None:
    scale = ScaleSet(1000)
    first = queries(scale, {"patient": 5, "range": 2})
    assert first == queries(scale, {"patient": 5, "range": 2})
    assert [q.kind for q in first] == ["patient"] * 5 + ["range"] * 2
    start, end = first[-1].keys["StudyDate"].split("-")
    assert int(end) > int(start)


def test_percentile_and_summary() -> None:
    values = list(range(1, 101))
    assert percentile(values, 0.5) == 51
    assert percentile(values, 0.99) == 99
    assert summary([])["p50"] is None
    assert summary([2.0, 4.0])["mean"] == 3.0


def _results_document(quick: bool, rates: dict[int, float]) -> dict:
    rows = [{"target": "grid", "corpus": "small", "associations": n, "instances_per_s": r} for n, r in rates.items()]
    rows.append({"target": "orthanc", "corpus": "small", "associations": 1, "instances_per_s": 999.0})
    return {"options": {"quick": quick}, "sections": {"ingest": {"rows": rows}}}


def test_full_runs_are_newest_first_and_skip_quick_runs_and_latest(tmp_path) -> None:
    for name, quick in [("2026-01-01T00-00-00+0000", False), ("2026-02-01T00-00-00+0000", True),
                        ("2026-01-15T00-00-00+0000", False), ("latest", False)]:
        (tmp_path / f"{name}.json").write_text(json.dumps(_results_document(quick, {1: 10.0})))
    (tmp_path / "2026-03-01T00-00-00+0000.json").write_text("{truncated")
    assert [name for name, _ in full_runs(tmp_path)] == ["2026-01-15T00-00-00+0000.json",
                                                         "2026-01-01T00-00-00+0000.json"]


def test_ingest_rates_come_from_this_session_then_the_newest_full_run_then_the_fallback() -> None:
    documents = [("new.json", _results_document(False, {4: 150.0})), ("old.json", _results_document(False, {1: 90.0, 4: 99.0}))]
    session_rows = _results_document(False, {1: 120.0})["sections"]["ingest"]["rows"]
    rates = ingest_rates((1, 4, 8), session_rows, documents)
    assert [(r.associations, r.instances_per_s) for r in rates] == [(1, 120.0), (4, 150.0), (8, FALLBACK_RATES[4])]
    assert rates[0].source == "this run's ingest section"
    assert "new" in rates[1].source and "fallback" in rates[2].source
    assert ingest_rates((1,), None, documents)[0].instances_per_s == 90.0


def test_answer_times_follow_the_corpus_order_of_contiguous_parts() -> None:
    assert answer_times([2, 1, 2], [[1.0, 2.0], [1.5], [1.2, 3.0]]) == [1.0, 2.0, 1.5, 1.2, 3.0]
    with pytest.raises(ValueError):
        answer_times([2, 2], [[1.0, 2.0], [1.5]])  # an association answered fewer files than it sent


def test_replica_lags_count_instances_without_a_verified_row_as_missing() -> None:
    answered = {"u1": 100.0, "u2": 101.0, "u3": 102.0}
    copies = {"u1": ("d1", 100.2), "u2": ("d2", 101.5)}  # u3 never announced
    written = {"d1": 100.25}  # d2 announced, its row not written yet
    lags = replica_lags(answered, copies, written)
    assert lags["missing"] == 2
    assert lags["ledger_ms"]["n"] == 1 and lags["ledger_ms"]["p50"] == pytest.approx(250.0)
    assert lags["event_ms"]["n"] == 2 and lags["event_ms"]["max"] == pytest.approx(500.0)


def test_replica_lags_by_part_follow_the_order_a_answered() -> None:
    answered = {f"u{i}": 100.0 + i for i in range(15)}
    copies = {uid: (f"d{uid}", 0.0) for uid in answered}
    # Falling behind: the k-th answered instance is replicated 100 ms * (k + 1) later.
    written = {f"du{i}": 100.0 + i + 0.1 * (i + 1) for i in range(15)}
    lags = replica_lags(dict(reversed(list(answered.items()))), copies, written, parts=5)
    assert lags["by_part_p50_ms"] == pytest.approx([200.0, 500.0, 800.0, 1100.0, 1400.0])


def _backlog_run(target: str, seconds: float, cpu: float, repetition: int = 1) -> BacklogRun:
    return BacklogRun(target, "backlog-small", repetition, 100, 4_000_000, seconds, None, None, 0.5, 50.0,
                      {"replicator (B)": cpu}, 100)


def test_backlog_rows_are_medians_over_repetitions() -> None:
    runs = [_backlog_run("grid", s, cpu, k) for k, (s, cpu) in enumerate([(1.0, 0.3), (2.0, 0.1), (0.5, 0.2)])]
    row = median_row("grid", runs)
    assert row.seconds == 1.0 and row.instances_per_s == 100.0
    assert row.spread_pct == 150.0  # (200 - 50) / 100
    assert row.cpu_ms_per_instance == {"replicator (B)": 2.0}
    assert row.ok and row.from_start_s is None


def test_replicator_profile_splits_the_replication_threads_by_step(tmp_path) -> None:
    handle = "Replicator.handle (processors/replicator.py)"
    worker = "thread (32451): replication_0"  # py-spy's raw format names threads so
    wall = tmp_path / "wall.txt"
    wall.write_text("\n".join([
        f"{worker};_worker (concurrent/futures/thread.py);{handle};record_copy (core/transfer.py);"
        "ReplicaLedger.record (core/ledger.py);Session.execute (cassandra/cluster.py) 30",
        f"{worker};_worker (concurrent/futures/thread.py);{handle};PayloadTransfer.fetch (core/transfer.py);"
        "BlobWriter.commit (core/blobstore.py) 10",
        f"{worker};_worker (concurrent/futures/thread.py);SimpleQueue.get (queue.py) 60",
        'thread (32422): MainThread;Worker.execute_from_commandline (mode/worker.py) 500',
    ]) + "\n")
    gil = tmp_path / "gil.txt"
    gil.write_text(f"{worker};{handle};ReplicaLedger.record (core/ledger.py) 3\n"
                   'thread (32422): MainThread;Stream._c_aiter (faust/streams.py) 1\n')
    profile = summarize_replicator(wall, gil, instances=10, wall_s=1.0, gil_s=1.0)
    steps = {s.name: s.pct for s in profile.wall_steps}
    assert steps == {"idle (no request to work on)": 60.0, "ledger write (Cassandra)": 30.0,
                     "commit: rename, fsync, fsync directory": 10.0}
    assert profile.worker.busy_pct == 4.0
    assert [s.name for s in profile.worker.by_thread] == ["replication threads (requests)", "event loop"]


def test_healing_rows_are_medians_and_cpu_is_per_instance_and_per_gb(tmp_path) -> None:
    from bench.healing import RECOVERY, SCRUB, RecoverRun, ScrubRun, drop_cached, recover_row, scrub_row

    recovers = [RecoverRun("small", k, 100, 100, 0, {}, 4_000_000, seconds, 0.5, 80.0, {RECOVERY: cpu})
                for k, (seconds, cpu) in enumerate([(1.0, 0.5), (2.0, 0.7), (4.0, 0.6)], 1)]
    row = recover_row(recovers)
    assert row["ok"] and row["instances_per_s"] == 50.0 and row["mb_per_s"] == 2.0
    assert row["cpu_s"][RECOVERY] == 0.6 and row["cpu_ms_per_instance"][RECOVERY] == 6.0
    assert row["spread_pct"] == 150.0
    assert not recover_row([RecoverRun("large", 1, 10, 9, 0, {"x": 1}, 1, 1.0, 0, 0, {})])["ok"]
    scrubs = [ScrubRun("cold", 1, 10, 500_000_000, 2.0, 0, 0, True, 0.5, 50.0, {SCRUB: 1.5})]
    assert scrub_row(scrubs)["mb_per_s"] == 250.0 and scrub_row(scrubs)["cpu_s_per_gb"][SCRUB] == 3.0
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "blob").write_bytes(b"x" * 10)
    assert drop_cached(tmp_path) == 1


def test_compiler_seconds_counts_only_threads_named_as_hotspot_compilers() -> None:
    import os
    import threading
    import time

    from bench.jit import compiler_seconds

    ready, stop = threading.Event(), threading.Event()
    tids: dict[str, int] = {}

    def spin(name: str) -> None:
        tid = threading.get_native_id()
        with open(f"/proc/self/task/{tid}/comm", "w") as fh:  # what HotSpot names its compiler threads
            fh.write(name)
        tids[name] = tid
        if len(tids) == 2:
            ready.set()
        while time.thread_time() < 0.3:  # this thread's own CPU time
            pass
        stop.wait(10)

    threads = [threading.Thread(target=spin, args=(n,)) for n in ("C2 CompilerThread0", "MutationStage-1")]
    for t in threads:
        t.start()
    try:
        assert ready.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and compiler_seconds(os.getpid()).get(tids["C2 CompilerThread0"], 0) < 0.2:
            time.sleep(0.05)
        found = compiler_seconds(os.getpid())
        assert set(found) == {tids["C2 CompilerThread0"]}
        assert found[tids["C2 CompilerThread0"]] >= 0.2
        assert compiler_seconds(os.getpid(), [tids["MutationStage-1"]]) == {}
        assert compiler_seconds(os.getpid(), [tids["C2 CompilerThread0"]]).keys() == found.keys()
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_retired_directories_are_renamed_aside_and_deleted_only_by_the_purge(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(retired, "RETIRED", tmp_path / "retired")
    monkeypatch.setattr(retired, "PURGED", tmp_path / "retired.purged")
    store = tmp_path / "blobs"
    (store / "ab").mkdir(parents=True)
    (store / "ab" / "payload").write_bytes(b"kept")
    inode = (store / "ab" / "payload").stat().st_ino
    retired.retire(store)
    retired.retire(tmp_path / "missing")
    assert not store.exists()
    (moved,) = (tmp_path / "retired").iterdir()
    # Renamed, not copied and deleted: the same inode, none freed.
    assert (moved / "ab" / "payload").stat().st_ino == inode
    assert retired.since_purge() is None and retired.wait_since_purge(60) == 0

    retired.purge()
    assert not (tmp_path / "retired").exists()
    since = retired.since_purge()
    assert since is not None and since < 60
    slept: list[float] = []
    monkeypatch.setattr(retired.time, "sleep", slept.append)
    waited = retired.wait_since_purge(3600)
    assert retired.RECENTLY_DELETED_S - 60 < waited <= retired.RECENTLY_DELETED_S and slept == [waited]
    assert retired.wait_since_purge(7) == 7
