"""Storage Commitment SCP, the parts without a network: request checks, verdicts, report content, and the
committer's rounds driven by hand against an in-memory transaction store (a fake clock, no sleeping)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomgrid.consumers.storage_commitment import (
    CLASS_INSTANCE_CONFLICT,
    COMMITTED,
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_ACTION,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    Committer,
    Refused,
    ReportNotDelivered,
    StorageCommitmentService,
    build_report,
    judge,
    parse_request,
    result_of,
)
from dicomgrid.core.commitments import (
    FINAL_STATES,
    PENDING,
    REPORTED,
    REPORTING,
    UNDELIVERABLE,
    CommitmentResult,
    Failure,
    OpenEntry,
    Reference,
    StoredState,
    Transaction,
)
from dicomgrid.core.config import DicomPeer, GridConfig, StorageCommitmentConfig

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
PUSH_INSTANCE = "1.2.840.10008.1.20.1.1"
T0 = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.timezone.utc)


def request_dataset(*items: tuple[str, str], transaction_uid: str | None = "1.2.3.99") -> Dataset:
    ds = Dataset()
    if transaction_uid is not None:
        ds.TransactionUID = transaction_uid
    seq = []
    for sop_class, sop_instance in items:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        seq.append(item)
    ds.ReferencedSOPSequence = seq
    return ds


# -- request checks -----------------------------------------------------------------------------


def test_a_request_names_its_transaction_and_instances_once_each() -> None:
    ds = request_dataset((CT, "1.2.3.1"), (MR, "1.2.3.2"), (CT, "1.2.3.1"))
    request = parse_request(1, PUSH_INSTANCE, lambda: ds, max_instances=10)
    assert request.transaction_uid == "1.2.3.99"
    assert request.items == (Reference(CT, "1.2.3.1"), Reference(MR, "1.2.3.2"))


def _refusal(action_type: Any, instance: Any, ds: Any, max_instances: int = 10) -> tuple[int, str]:
    with pytest.raises(Refused) as caught:
        parse_request(action_type, instance, ds if callable(ds) else (lambda: ds), max_instances)
    return caught.value.status, caught.value.comment


def _undecodable() -> Dataset:
    raise ValueError("bad tag")


@pytest.mark.parametrize(
    ("action_type", "instance", "ds", "status", "says"),
    [
        (2, PUSH_INSTANCE, request_dataset((CT, "1.2.3.1")), NO_SUCH_ACTION, "action type 2"),
        (1, "1.2.3.4", request_dataset((CT, "1.2.3.1")), NO_SUCH_OBJECT_INSTANCE, "requested SOP instance"),
        (1, PUSH_INSTANCE, None, INVALID_ARGUMENT_VALUE, "no action information"),
        (1, PUSH_INSTANCE, _undecodable, INVALID_ARGUMENT_VALUE, "cannot be decoded: ValueError"),
        (1, PUSH_INSTANCE, request_dataset((CT, "1.2.3.1"), transaction_uid=None), INVALID_ARGUMENT_VALUE,
         "Transaction UID"),
        (1, PUSH_INSTANCE, request_dataset((CT, "1.2.3.1"), transaction_uid="1.2.abc"), INVALID_ARGUMENT_VALUE,
         "Transaction UID"),
        (1, PUSH_INSTANCE, request_dataset(), INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence"),
        (1, PUSH_INSTANCE, request_dataset((CT, "1.2.3.1"), (CT, "")), INVALID_ARGUMENT_VALUE, "item 2"),
    ],
)
def test_malformed_requests_are_refused_with_the_matching_status(action_type, instance, ds, status, says) -> None:
    code, comment = _refusal(action_type, instance, ds)
    assert code == status
    assert says in comment


def test_a_request_over_the_size_limit_is_a_resource_limitation() -> None:
    ds = request_dataset(*[(CT, f"1.2.3.{n}") for n in range(1, 5)])
    assert _refusal(1, PUSH_INSTANCE, ds, max_instances=3)[0] == RESOURCE_LIMITATION


# -- verdicts -----------------------------------------------------------------------------------

SITES = ("A", "B")
REF = Reference(CT, "1.2.3.1")


def verdict(state: StoredState | None, now: dt.datetime, **kw: Any) -> Any:
    args = dict(now=now, requested_at=T0, deadline=T0 + dt.timedelta(seconds=60),
                unknown_grace=dt.timedelta(seconds=5), min_copies=2, sites=SITES)
    args.update(kw)
    return judge(REF, state, **args)


@pytest.mark.parametrize(
    ("state", "seconds", "expected"),
    [
        (StoredState(CT, "d", frozenset({"A", "B"})), 1, COMMITTED),
        (StoredState(CT, "d", frozenset({"A"})), 1, None),  # waits for the second copy
        (StoredState(CT, "d", frozenset({"A"})), 60, PROCESSING_FAILURE),  # ... until the deadline
        (StoredState(CT, "d", frozenset({"A", "OLD"})), 1, None),  # a site not in the grid is no copy
        (StoredState(CT, "d", frozenset()), 60, PROCESSING_FAILURE),
        (StoredState(MR, "d", frozenset({"A", "B"})), 1, CLASS_INSTANCE_CONFLICT),  # at once
        (StoredState(None, "d", frozenset({"A", "B"})), 1, None),  # not indexed yet: its class is unknown
        (StoredState(None, "d", frozenset({"A", "B"})), 60, PROCESSING_FAILURE),
        (None, 1, None),  # unknown, within the grace period
        (None, 5, NO_SUCH_OBJECT_INSTANCE),
    ],
)
def test_verdicts(state: StoredState | None, seconds: int, expected: Any) -> None:
    assert verdict(state, T0 + dt.timedelta(seconds=seconds)) == expected


def test_an_unknown_instance_fails_at_the_deadline_even_if_the_grace_is_longer() -> None:
    now = T0 + dt.timedelta(seconds=3)
    assert verdict(None, now, deadline=now, unknown_grace=dt.timedelta(seconds=10)) == NO_SUCH_OBJECT_INSTANCE


def test_one_copy_is_enough_when_min_copies_is_one() -> None:
    assert verdict(StoredState(CT, "d", frozenset({"B"})), T0, min_copies=1) == COMMITTED


# -- report content -----------------------------------------------------------------------------


def test_all_committed_is_event_type_1_with_the_referenced_instances_and_where_to_retrieve_them() -> None:
    refs = (Reference(CT, "1.2.3.1"), Reference(MR, "1.2.3.2"))
    event_type, ds = build_report("1.2.3.99", CommitmentResult(refs), "GRID_A")
    assert event_type == 1
    assert ds.TransactionUID == "1.2.3.99" and ds.RetrieveAETitle == "GRID_A"
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence] == [
        (CT, "1.2.3.1"), (MR, "1.2.3.2")
    ]
    assert "FailedSOPSequence" not in ds


def test_a_mixed_result_is_event_type_2_with_both_sequences_and_each_failure_reason() -> None:
    items = (Reference(CT, "1.2.3.1"), Reference(CT, "1.2.3.2"), Reference(MR, "1.2.3.3"))
    result = result_of(items, {items[0]: NO_SUCH_OBJECT_INSTANCE, items[1]: COMMITTED,
                               items[2]: CLASS_INSTANCE_CONFLICT})
    event_type, ds = build_report("1.2.3.99", result, "GRID_A")
    assert event_type == 2
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == ["1.2.3.2"]
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID, i.FailureReason) for i in ds.FailedSOPSequence] == [
        (CT, "1.2.3.1", 0x0112), (MR, "1.2.3.3", 0x0119)
    ]


def test_nothing_committed_has_no_referenced_sop_sequence() -> None:
    event_type, ds = build_report("1.2.3.99", CommitmentResult((), (Failure(REF, PROCESSING_FAILURE),)), "GRID_A")
    assert event_type == 2
    assert "ReferencedSOPSequence" not in ds and "RetrieveAETitle" not in ds
    assert ds.FailedSOPSequence[0].FailureReason == 0x0110


def test_results_survive_their_json_form() -> None:
    result = CommitmentResult((REF,), (Failure(Reference(MR, "1.2.3.5"), 0x0119),))
    assert CommitmentResult.from_json(result.to_json()) == result


# -- the committer, against an in-memory store ---------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class MemoryTables:
    """The two tables of one site, shared by the stores of several receivers."""

    def __init__(self) -> None:
        self.rows: dict[str, Transaction] = {}
        self.open: dict[str, dt.datetime] = {}


class MemoryStore:
    """The conditional updates of core.commitments.TransactionStore, on dicts."""

    def __init__(self, tables: MemoryTables, owner: str, lease_s: float = 3.0) -> None:
        self.tables = tables
        self.owner = owner
        self.lease = dt.timedelta(seconds=lease_s)
        self.site = "A"

    def new_transaction(self, uid, requestor_ae, address, items, now, timeout_s) -> Transaction:
        deadline = now + dt.timedelta(seconds=timeout_s)
        return Transaction("grid", "A", uid, requestor_ae, address, tuple(items), now, deadline, PENDING, self.owner,
                           now + self.lease)

    def open(self, tx: Transaction) -> Transaction | None:
        self.tables.open[tx.uid] = tx.requested_at
        if tx.uid in self.tables.rows:
            return self.tables.rows[tx.uid]
        self.tables.rows[tx.uid] = tx
        return None

    def reopen(self, tx: Transaction) -> None:
        self.tables.open[tx.uid] = tx.requested_at

    def open_entries(self) -> list[OpenEntry]:
        return [OpenEntry(uid, created) for uid, created in self.tables.open.items()]

    def load(self, uid: str) -> Transaction | None:
        return self.tables.rows.get(uid)

    def forget(self, uid: str) -> None:
        self.tables.open.pop(uid, None)

    def _update(self, uid: str, condition: Any, **changes: Any) -> bool:
        tx = self.tables.rows[uid]
        if not condition(tx):
            return False
        self.tables.rows[uid] = replace(tx, **changes)
        return True

    def claim(self, tx: Transaction, now: dt.datetime) -> Transaction | None:
        ok = self._update(tx.uid, lambda r: r.state == tx.state and r.lease_until < now,
                          owner=self.owner, lease_until=now + self.lease)
        return self.tables.rows[tx.uid] if ok else None

    def renew(self, uid: str, now: dt.datetime) -> dt.datetime | None:
        return now + self.lease if self._update(uid, lambda r: r.owner == self.owner, lease_until=now + self.lease) \
            else None

    def release(self, uid: str, now: dt.datetime) -> bool:
        return self._update(uid, lambda r: r.owner == self.owner, lease_until=now)

    def begin_report(self, uid: str, result: CommitmentResult) -> bool:
        return self._update(uid, lambda r: r.owner == self.owner and r.state == PENDING, state=REPORTING,
                            result=result)

    def finish(self, uid: str, state: str, attempts: int, now: dt.datetime, note: str | None = None) -> bool:
        ok = self._update(uid, lambda r: r.owner == self.owner and r.state == REPORTING, state=state,
                          report_attempts=attempts, reported_at=now, note=note)
        if ok:
            self.forget(uid)
        return ok


class FakeStates:
    def __init__(self) -> None:
        self.known: dict[str, StoredState] = {}

    def lookup(self, uids):
        return {u: self.known[u] for u in uids if u in self.known}


class FakeSender:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sent: list[tuple[str, int, Dataset]] = []
        self.attempts = 0

    def send(self, peer: DicomPeer, called_ae: str, event_type: int, info: Dataset) -> None:
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise ReportNotDelivered("connection refused")
        self.sent.append((called_ae, event_type, info))


class FakeAudit:
    def __init__(self) -> None:
        self.records: list[tuple[str, int, str]] = []

    def record(self, action, event, outcome, description, participants, objects=()):
        self.records.append((event, outcome, description))


SETTINGS = StorageCommitmentConfig(timeout_s=60, unknown_grace_s=5, lease_s=3, scan_interval_s=1, report_attempts=3)


def committer(tables: MemoryTables, owner: str, clock: Clock, states: FakeStates, sender: FakeSender,
              audit: FakeAudit | None = None, settings: StorageCommitmentConfig = SETTINGS) -> Committer:
    sleeps: list[float] = []
    c = Committer(  # type: ignore[arg-type]
        site="A", ae_title="GRID_A", store=MemoryStore(tables, owner, settings.lease_s), states=states,
        sender=sender, audit=audit or FakeAudit(), settings=settings, min_copies=2, sites=SITES,
        remote_aes={"PACS": DicomPeer(host="127.0.0.1", port=4100)}, clock=clock,
        submit=lambda job: job(), sleep=sleeps.append,
    )
    c.sleeps = sleeps  # type: ignore[attr-defined]
    return c


def accept(c: Committer, clock: Clock, *refs: Reference, uid: str | None = None) -> Transaction:
    tx = c.store.new_transaction(uid or generate_uid(), "PACS", "127.0.0.1:5000", refs, clock(), SETTINGS.timeout_s)
    assert c.store.open(tx) is None
    c.adopt(tx)
    return tx


@pytest.fixture
def world() -> tuple[MemoryTables, Clock, FakeStates, FakeSender, FakeAudit]:
    return MemoryTables(), Clock(), FakeStates(), FakeSender(), FakeAudit()


def test_a_transaction_is_reported_once_when_its_instances_have_their_copies(world) -> None:
    tables, clock, states, sender, audit = world
    c = committer(tables, "r1", clock, states, sender, audit)
    a, b = Reference(CT, "1.2.3.1"), Reference(CT, "1.2.3.2")
    tx = accept(c, clock, a, b)
    states.known[a.sop_instance_uid] = StoredState(CT, "da", frozenset({"A", "B"}))
    states.known[b.sop_instance_uid] = StoredState(CT, "db", frozenset({"A"}))
    c.step()
    assert sender.sent == []  # b has one copy

    clock.advance(1)
    states.known[b.sop_instance_uid] = StoredState(CT, "db", frozenset({"A", "B"}))
    c.step()
    c.step()
    assert [(ae, event_type) for ae, event_type, _ in sender.sent] == [("PACS", 1)]
    assert [i.ReferencedSOPInstanceUID for i in sender.sent[0][2].ReferencedSOPSequence] == ["1.2.3.1", "1.2.3.2"]
    row = tables.rows[tx.uid]
    assert row.state == REPORTED and row.report_attempts == 1 and tx.uid not in tables.open
    assert c.owned() == []
    assert [(e, o) for e, o, _ in audit.records] == [("Storage Commitment", 0)]


def test_unknown_instances_fail_after_the_grace_without_waiting_for_the_timeout(world) -> None:
    tables, clock, states, sender, _ = world
    c = committer(tables, "r1", clock, states, sender)
    accept(c, clock, Reference(CT, "1.2.3.7"))
    c.step()
    assert sender.sent == []
    clock.advance(SETTINGS.unknown_grace_s)
    c.step()
    assert [(e, i.FailureReason) for _, e, ds in sender.sent for i in ds.FailedSOPSequence] == [(2, 0x0112)]


def test_instances_short_of_copies_fail_with_0110_at_the_deadline(world) -> None:
    tables, clock, states, sender, _ = world
    c = committer(tables, "r1", clock, states, sender)
    states.known["1.2.3.1"] = StoredState(CT, "d", frozenset({"A"}))
    accept(c, clock, Reference(CT, "1.2.3.1"))
    for _ in range(59):
        clock.advance(1)
        c.step()
    assert sender.sent == []
    clock.advance(1)
    c.step()
    assert sender.sent[0][2].FailedSOPSequence[0].FailureReason == 0x0110


def test_an_unreachable_requestor_gets_report_attempts_tries_then_the_failure_is_audited(world) -> None:
    tables, clock, states, _, audit = world
    sender = FakeSender(failures=10)
    c = committer(tables, "r1", clock, states, sender, audit)
    states.known["1.2.3.1"] = StoredState(CT, "d", frozenset({"A", "B"}))
    tx = accept(c, clock, Reference(CT, "1.2.3.1"))
    c.step()
    assert sender.attempts == SETTINGS.report_attempts
    assert len(c.sleeps) == SETTINGS.report_attempts - 1  # type: ignore[attr-defined]
    assert all(0 < s <= SETTINGS.report_backoff_max_s for s in c.sleeps)  # type: ignore[attr-defined]
    row = tables.rows[tx.uid]
    assert row.state == UNDELIVERABLE and row.report_attempts == 3 and "connection refused" in row.note
    assert tx.uid not in tables.open
    assert audit.records[-1][1] == 8 and "not delivered after 3 attempt(s)" in audit.records[-1][2]


def test_a_report_that_fails_once_is_delivered_on_the_next_attempt(world) -> None:
    tables, clock, states, _, audit = world
    sender = FakeSender(failures=1)
    c = committer(tables, "r1", clock, states, sender, audit)
    states.known["1.2.3.1"] = StoredState(CT, "d", frozenset({"A", "B"}))
    tx = accept(c, clock, Reference(CT, "1.2.3.1"))
    c.step()
    assert len(sender.sent) == 1 and tables.rows[tx.uid].report_attempts == 2


def test_a_dead_receivers_transaction_is_taken_over_by_exactly_one_other(world) -> None:
    tables, clock, states, sender, _ = world
    dead = committer(tables, "dead", clock, states, sender)
    tx = accept(dead, clock, Reference(CT, "1.2.3.1"))
    dead.step()  # it owned the transaction, then stopped without a word
    r1, r2 = committer(tables, "r1", clock, states, sender), committer(tables, "r2", clock, states, sender)
    r1.step()
    r2.step()
    assert r1.owned() == r2.owned() == []  # the lease still runs

    clock.advance(SETTINGS.lease_s + 0.1)
    r1.step()
    r2.step()
    assert (r1.owned(), r2.owned()) == ([tx.uid], [])
    assert tables.rows[tx.uid].owner == "r1"

    states.known["1.2.3.1"] = StoredState(CT, "d", frozenset({"A", "B"}))
    for _ in range(3):
        clock.advance(1)
        r1.step()
        r2.step()
    assert len(sender.sent) == 1 and tables.rows[tx.uid].state == REPORTED


def test_the_owner_keeps_its_lease_while_it_waits(world) -> None:
    tables, clock, states, sender, _ = world
    owner = committer(tables, "r1", clock, states, sender)
    other = committer(tables, "r2", clock, states, sender)
    tx = accept(owner, clock, Reference(CT, "1.2.3.1"))
    for _ in range(20):
        clock.advance(0.5)
        owner.step()
        other.step()
    assert tables.rows[tx.uid].owner == "r1" and other.owned() == []


def test_a_transaction_left_reporting_is_reported_by_the_next_owner_with_the_result_kept(world) -> None:
    tables, clock, states, sender, _ = world
    kept = CommitmentResult((), (Failure(Reference(CT, "1.2.3.1"), NO_SUCH_OBJECT_INSTANCE),))
    tx = Transaction("grid", "A", "1.2.3.50", "PACS", "", (Reference(CT, "1.2.3.1"),), T0,
                     T0 + dt.timedelta(seconds=60), REPORTING, "dead", T0, kept)
    tables.rows[tx.uid], tables.open[tx.uid] = tx, T0
    # Since then the instance has arrived; the report still says what was decided.
    states.known["1.2.3.1"] = StoredState(CT, "d", frozenset({"A", "B"}))
    clock.advance(1)
    committer(tables, "r1", clock, states, sender).step()
    assert [i.FailureReason for i in sender.sent[0][2].FailedSOPSequence] == [0x0112]
    assert tables.rows[tx.uid].state in FINAL_STATES


def test_scans_clean_up_finished_and_orphaned_open_entries(world) -> None:
    tables, clock, states, sender, _ = world
    done = Transaction("grid", "A", "1.2.3.60", "PACS", "", (REF,), T0, T0, REPORTED, "x", T0)
    tables.rows[done.uid], tables.open[done.uid] = done, T0
    tables.open["1.2.3.61"] = T0  # its N-ACTION never wrote the transaction
    clock.advance(1)
    c = committer(tables, "r1", clock, states, sender)
    c.step()
    assert list(tables.open) == ["1.2.3.61"]  # still within a lease of its creation
    clock.advance(SETTINGS.lease_s)
    c.step()
    assert tables.open == {}


def test_close_gives_the_leases_up(world) -> None:
    tables, clock, states, sender, _ = world
    c = committer(tables, "r1", clock, states, sender)
    tx = accept(c, clock, Reference(CT, "1.2.3.1"))
    c.close()
    assert tables.rows[tx.uid].lease_until == clock() and c.owned() == []
    successor = committer(tables, "r2", clock, states, sender)
    clock.advance(0.001)
    successor.step()
    assert successor.owned() == [tx.uid]


def test_an_outcome_cassandra_did_not_take_is_written_later_and_the_report_not_sent_again(world) -> None:
    tables, clock, states, sender, audit = world
    c = committer(tables, "r1", clock, states, sender, audit)
    states.known["1.2.3.1"] = StoredState(CT, "d", frozenset({"A", "B"}))
    tx = accept(c, clock, Reference(CT, "1.2.3.1"))
    finish = c.store.finish

    def unavailable(*args, **kwargs):
        raise TimeoutError("Cassandra timed out")

    c.store.finish = unavailable  # type: ignore[method-assign]
    c.step()
    assert len(sender.sent) == 1 and tables.rows[tx.uid].state == REPORTING and c.owned() == [tx.uid]
    for _ in range(4):  # the lease is kept meanwhile, so nobody else takes the transaction
        clock.advance(1)
        c.step()
    assert tables.rows[tx.uid].owner == "r1" and tables.rows[tx.uid].lease_until > clock()

    c.store.finish = finish  # type: ignore[method-assign]
    clock.advance(1)
    c.step()
    assert tables.rows[tx.uid].state == REPORTED and c.owned() == []
    assert len(sender.sent) == 1 and len(audit.records) == 1


# -- the N-ACTION handler ------------------------------------------------------------------------

PUSH_CLASS = "1.2.840.10008.1.20.1"


def service(tables: MemoryTables, audit: FakeAudit) -> StorageCommitmentService:
    config = GridConfig(
        sites=[{"name": "A", "ae_title": "GRID_A", "dicom_port": 11112, "http_port": 8081, "storage_root": "a",
                "cassandra_dc": "dc1"}],
        cassandra={"replication": {"dc1": 1}},
        remote_aes={"PACS": {"host": "127.0.0.1", "port": 4100}},
    )
    site = SimpleNamespace(config=config, site=config.site("A"), db=None, audit=audit)
    svc = StorageCommitmentService(site)  # type: ignore[arg-type]
    svc.store = MemoryStore(tables, "r1")  # type: ignore[assignment]
    svc.committer.adopted = []  # type: ignore[attr-defined]
    svc.committer.adopt = svc.committer.adopted.append  # type: ignore[method-assign, attr-defined]
    return svc


def n_action(calling_ae: str, ds: Dataset, action_type: int = 1) -> SimpleNamespace:
    requestor = SimpleNamespace(ae_title=calling_ae, address="10.1.2.3", port=4000)
    return SimpleNamespace(
        assoc=SimpleNamespace(requestor=requestor), action_type=action_type, action_information=ds,
        request=SimpleNamespace(RequestedSOPClassUID=PUSH_CLASS, RequestedSOPInstanceUID=PUSH_INSTANCE),
    )


def test_an_accepted_n_action_is_kept_before_the_answer_and_handed_to_the_committer() -> None:
    tables, audit = MemoryTables(), FakeAudit()
    svc = service(tables, audit)
    status, _ = svc.on_n_action(n_action("PACS", request_dataset((CT, "1.2.3.1"))))  # type: ignore[arg-type]
    assert status == 0x0000
    kept = tables.rows["1.2.3.99"]
    assert (kept.requestor_ae, kept.requestor_address, kept.items) == ("PACS", "10.1.2.3:4000", (REF,))
    assert kept.deadline - kept.requested_at == dt.timedelta(seconds=60) and "1.2.3.99" in tables.open
    assert [tx.uid for tx in svc.committer.adopted] == ["1.2.3.99"]  # type: ignore[attr-defined]
    assert audit.records[0][1] == 0 and audit.records[0][2].startswith("N-ACTION accepted, transaction 1.2.3.99")


def test_a_requestor_not_in_remote_aes_is_refused_and_nothing_is_kept() -> None:
    tables, audit = MemoryTables(), FakeAudit()
    event = n_action("STORESCU", request_dataset((CT, "1.2.3.1")))
    status, _ = service(tables, audit).on_n_action(event)  # type: ignore[arg-type]
    assert status.Status == 0x0110 and "remote_aes" in status.ErrorComment
    assert tables.rows == {} and audit.records[0][1] == 4


def test_a_repeated_n_action_is_accepted_once_and_a_different_one_with_its_uid_refused() -> None:
    tables, audit = MemoryTables(), FakeAudit()
    svc = service(tables, audit)
    ds = request_dataset((CT, "1.2.3.1"))
    assert svc.on_n_action(n_action("PACS", ds))[0] == 0x0000  # type: ignore[arg-type]
    assert svc.on_n_action(n_action("PACS", ds))[0] == 0x0000  # type: ignore[arg-type]
    assert len(svc.committer.adopted) == 1  # type: ignore[attr-defined]
    other = svc.on_n_action(n_action("PACS", request_dataset((CT, "1.2.3.2"))))[0]  # type: ignore[arg-type]
    assert other.Status == 0x0110 and "already in use" in other.ErrorComment
    tables.rows["1.2.3.99"] = replace(tables.rows["1.2.3.99"], state=REPORTED)
    done = svc.on_n_action(n_action("PACS", ds))[0]  # type: ignore[arg-type]
    assert done.Status == 0x0110 and "already reported" in done.ErrorComment
