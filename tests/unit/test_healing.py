"""Healing jobs over two real blob stores and a real payload endpoint (the index and ledger are stand-ins)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from dicomgrid.core.events import InstanceRef
from dicomgrid.processors.healing_schedule import Schedule
from dicomgrid.processors.recovery import Recovery
from dicomgrid.core.transfer import PayloadTransfer
from tests.unit.peer_sites import TwoSites


class VersionsIndex:
    """instance_versions as the healing jobs scan them."""

    def __init__(self) -> None:
        self.rows: list[SimpleNamespace] = []

    def add(self, digest: str, size: int, site: str) -> None:
        self.rows.append(SimpleNamespace(sop_instance_uid=f"1.2.{len(self.rows) + 1}", sha256=digest, version=1,
                                         study_uid="1.2.3", size=size, received_site=site))

    def all_versions(self):
        return list(self.rows)


def test_recovery_copies_what_the_site_lacks_and_resumes_from_its_checkpoint(sites: TwoSites, tmp_path):
    index = VersionsIndex()
    payloads = [os.urandom(50_000 + n) for n in range(6)]
    for data in payloads:
        index.add(sites.put(sites.b, data), len(data), "B")  # received at B: A should hold copies too
    sites.a.index = index  # type: ignore[assignment]
    checkpoint = tmp_path / "recover-A.done"
    recovery = Recovery(sites.a, PayloadTransfer(sites.a), checkpoint, concurrency=3)
    plan, already = recovery.plan()
    assert (len(plan), already) == (6, 0)
    # An interrupted run settled the first two (their digests are in the checkpoint).
    first = recovery.run(plan[:2])
    assert (first.copied, first.held) == (2, 0) and not checkpoint.exists()  # a run that ended well forgets it
    checkpoint.write_text("".join(h.sha256 + "\n" for h in plan[:2]))
    plan, already = recovery.plan()
    assert (len(plan), already) == (4, 2)
    sites.put(sites.a, payloads[5])  # and one is already there
    report = recovery.run(plan, already)
    assert (report.planned, report.held, report.copied, dict(report.failed)) == (6, 3, 3, {})
    assert all(sites.a.blobs.verify(h.sha256) for h in recovery.plan()[0] + plan)
    assert all("A" in sites.ledger.verified_sites(h.sha256) for h in plan)


def test_recovery_reports_what_no_site_can_provide(sites: TwoSites, tmp_path):
    index = VersionsIndex()
    index.add("ab" * 32, 10, "B")
    sites.a.index = index  # type: ignore[assignment]
    recovery = Recovery(sites.a, PayloadTransfer(sites.a), tmp_path / "done")
    report = recovery.run(*recovery.plan())
    assert dict(report.failed) == {"no intact copy at any other site": 1} and report.unavailable == ["ab" * 32]
    assert not report.ok and (tmp_path / "done").read_text() == ""  # nothing settled, to be tried again


def test_a_schedule_is_due_once_per_period_and_at_once_after_an_interrupted_pass(tmp_path):
    state = tmp_path / "scrub.last"
    schedule = Schedule(state, 3600.0, now=1000.0)
    assert not schedule.due(now=1000.0 + 3599)  # a fresh site's first pass comes one period later
    assert schedule.due(now=1000.0 + 3600)
    assert schedule.due(interrupted=True, now=1001.0)
    schedule.done(now=5000.0)
    assert Schedule(state, 3600.0, now=9999.0).last_done() == 5000.0  # a restart keeps the last completion


@pytest.mark.parametrize("origin, expected", [("A", {"A", "B"}), ("B", {"A", "B"}), ("GONE", {"GONE"})])
def test_holders_follow_replicate_to(sites: TwoSites, origin, expected):
    from dicomgrid.processors.replication_policy import holders

    assert holders(sites.a.config, origin) == expected


def test_instance_refs_survive_the_request_round_trip():
    ref = InstanceRef("1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "2026-01-01T00:00:00Z")
    assert InstanceRef.of_event({**ref.fields()}) == ref
