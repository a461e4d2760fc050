"""DCMTK's storescu sends the pydicom corpus to site A: each file is stored verbatim or refused clearly.

Every accepted file is announced on ``dicom.instance.stored`` once per new payload (an identical resend
is an idempotent success), kept byte for byte as it came over the wire, and indexed in both datacenters.
Refusals must be exactly the expected, explained ones.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from dicomgrid import schemas
from dicomgrid.core.blobstore import BlobStore
from dicomgrid.core.config import SiteConfig
from dicomgrid.core.dicomfile import canonical_file_meta, split_file_meta
from dicomgrid.core.events import StoredVersion
from dicomgrid.core.index_reader import IndexReader
from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool
from tests.grid import EventTap
from tests.interop.corpus import STORESCU_OPTIONS, Sample, load_corpus

pytestmark = [
    pytest.mark.interop,
    pytest.mark.cluster,
    # bad_sequence.dcm's SOP Instance UID is a hex digest; pydicom warns whenever it decodes it.
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]

# Files the grid refuses, with what storescu reports: the response status, or why it sent no request.
EXPECTED_REFUSALS = {
    # Its SOP Instance UID is a 64-character hex digest, not a UID: 0xC001 (cannot understand).
    "pydicom-data:bad_sequence.dcm": "0xC001",
    # pydicom's JPEG-LS samples carry no Study or Series Instance UID, and the grid files every instance
    # under its study and series: 0xC001.
    "pydicom:JPEGLSNearLossless_08.dcm": "0xC001",
    "pydicom:JPEGLSNearLossless_16.dcm": "0xC001",
    "pydicom:SC_rgb_jls_lossy_line.dcm": "0xC001",
    "pydicom:SC_rgb_jls_lossy_sample.dcm": "0xC001",
}

P_DATA_TF = 0x04
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001


# -- what crossed the wire ------------------------------------------------------------------------


@dataclass
class StoreExchange:
    """One C-STORE as it crossed the wire: the request's UIDs, the data set bytes and the response."""

    sop_class_uid: str
    sop_instance_uid: str
    data_set: bytes = b""
    status: int | None = None
    error_comment: str | None = None


def _decode_command(message: bytes) -> Dataset:
    # Command sets are always Implicit VR Little Endian (PS3.7 6.3.1).
    return read_dataset(io.BytesIO(message), is_implicit_VR=True, is_little_endian=True)


class _PDataReader:
    """Reassembles the command and data set messages of one direction of an association (PS3.8 9.3.5)."""

    def __init__(self, on_message: Callable[[bool, bytes], None]) -> None:
        self._on_message = on_message
        self._buffer = bytearray()
        self._fragments = {True: bytearray(), False: bytearray()}
        self.error: Exception | None = None

    def feed(self, data: bytes) -> None:
        """Parse relayed bytes; a failure is kept in ``error`` and never stops the relay itself."""
        if self.error is None:
            try:
                self._parse(data)
            except Exception as exc:
                self.error = exc

    def _parse(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 6:
            pdu_type, (length,) = self._buffer[0], struct.unpack_from(">I", self._buffer, 2)
            if len(self._buffer) < 6 + length:
                return
            pdu = bytes(self._buffer[6 : 6 + length])
            del self._buffer[: 6 + length]
            if pdu_type == P_DATA_TF:
                self._read_pdvs(pdu)

    def _read_pdvs(self, pdu: bytes) -> None:
        offset = 0
        while offset < len(pdu):
            (length,) = struct.unpack_from(">I", pdu, offset)
            control = pdu[offset + 5]  # bit 0: command (else data set); bit 1: last fragment
            is_command = bool(control & 1)
            self._fragments[is_command] += pdu[offset + 6 : offset + 4 + length]
            if control & 2:
                self._on_message(is_command, bytes(self._fragments[is_command]))
                self._fragments[is_command].clear()
            offset += 4 + length


def _relay(source: socket.socket, sink: socket.socket, reader: _PDataReader) -> None:
    with suppress(OSError):
        while data := source.recv(1 << 16):
            reader.feed(data)
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class WireRecorder:
    """A TCP relay to the grid that records every C-STORE passing through it.

    storescu does not send a file's bytes: DCMTK decodes each file and encodes the data set again, which
    drops trailing padding, gives undefined-length sequences explicit lengths, deflates anew, and so on.
    What the grid promises to keep byte for byte is what it received, so that is what is recorded here.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        # The relay's end of each connection to the grid: the peer address events name as their source.
        self.peers: list[str] = []
        self.exchanges: dict[int, StoreExchange] = {}  # by request Message ID
        self._pending: StoreExchange | None = None
        self._readers: list[_PDataReader] = []
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    @property
    def errors(self) -> list[Exception]:
        return [reader.error for reader in self._readers if reader.error is not None]

    def __enter__(self) -> WireRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=30)
        for sock in self._sockets:
            sock.close()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self._target)
                for sock in (client, upstream):
                    # Like DCMTK with TCP_NODELAY=1: no delayed-ACK stall on each DIMSE round trip.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._sockets.append(sock)
                host, port = upstream.getsockname()[:2]
                self.peers.append(f"{host}:{port}")
                self._readers += [_PDataReader(self._from_requestor), _PDataReader(self._from_acceptor)]
                self._spawn(_relay, client, upstream, self._readers[-2])
                self._spawn(_relay, upstream, client, self._readers[-1])

    def _from_requestor(self, is_command: bool, message: bytes) -> None:
        if is_command:
            command = _decode_command(message)
            self._pending = None
            if command.CommandField == C_STORE_RQ:
                self._pending = StoreExchange(str(command.AffectedSOPClassUID), str(command.AffectedSOPInstanceUID))
                self.exchanges[command.MessageID] = self._pending
        elif self._pending is not None:
            self._pending.data_set = message

    def _from_acceptor(self, is_command: bool, message: bytes) -> None:
        command = _decode_command(message) if is_command else None
        if command is not None and command.CommandField == C_STORE_RSP:
            exchange = self.exchanges[command.MessageIDBeingRespondedTo]
            exchange.status = int(command.Status)
            exchange.error_comment = command.get("ErrorComment")


# -- what storescu did ----------------------------------------------------------------------------


@dataclass
class Attempt:
    """What storescu did with one file, and what the wire saw of it."""

    sample: Sample
    response: str | None = None  # storescu's wording of the response status, e.g. "Success"
    error: str | None = None  # storescu's first error or warning about the file
    exchange: StoreExchange | None = None
    peer: str | None = None

    @property
    def accepted(self) -> bool:
        return self.response == "Success"

    @cached_property
    def payload_sha256(self) -> str:
        """The digest the grid names the payload by: its canonical file meta plus the data set as sent."""
        meta = canonical_file_meta(
            self.exchange.sop_class_uid, self.exchange.sop_instance_uid, self.sample.transfer_syntax
        )
        return hashlib.sha256(meta + self.exchange.data_set).hexdigest()

    @property
    def tried(self) -> bool:
        """storescu got as far as sending the file (whether or not a request went out)."""
        return self.peer is not None

    @property
    def outcome(self) -> str:
        """How a refusal shows up: the DIMSE status, or why no request was sent."""
        if self.exchange is not None and self.exchange.status is not None:
            return f"0x{self.exchange.status:04X}"
        return self.error or "no response"


_SENDING = re.compile(r"I: Sending file: (?P<path>.+)$")
_REQUEST = re.compile(r"I: Sending Store Request \(MsgID (?P<id>\d+),")
_RESPONSE = re.compile(r"I: Received Store Response \((?P<status>.+)\)$")
_IGNORED = re.compile(r"W: (?P<reason>.+) in file: (?P<path>.+), ignoring file$")
_ERROR = re.compile(r"E: (?P<error>.+)$")


def run_storescu(samples: list[Sample], option: str, site: SiteConfig) -> list[Attempt]:
    """Send ``samples`` in one storescu run through a :class:`WireRecorder`; one attempt per file.

    ``-R`` proposes only the presentation contexts the files need (storescu's default list holds 64 SOP
    classes and would leave the rest of the corpus without a context), ``-nh`` keeps going after a
    refusal, ``-v`` logs every file sent and every response.
    """
    attempts = {str(s.path): Attempt(s) for s in samples}
    with WireRecorder((site.dicom_host, site.dicom_port)) as wire:
        done = subprocess.run(
            [require_dcmtk_tool("storescu"), "-v", "-nh", "-R", option, "-aet", "STORESCU", "-aec", site.ae_title,
             "127.0.0.1", str(wire.port), *attempts],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=120,
        )
    assert not wire.errors, f"could not follow the association: {wire.errors}"
    assert len(wire.peers) <= 1, "storescu opened more than one association"
    current: Attempt | None = None
    for line in done.stdout.splitlines():
        if match := _SENDING.match(line):
            current = attempts[match["path"]]
            current.peer = wire.peers[0]
        elif match := _IGNORED.match(line):
            attempts[match["path"]].error = match["reason"]
        elif current is None:
            continue
        elif match := _REQUEST.match(line):
            current.exchange = wire.exchanges[int(match["id"])]
        elif match := _RESPONSE.match(line):
            current.response = match["status"]
        elif (match := _ERROR.match(line)) and current.error is None:
            current.error = match["error"]
    assert wire.peers or all(a.error for a in attempts.values()), f"storescu did not associate:\n{done.stdout}"
    return list(attempts.values())


# -- what the grid should do ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedEvent:
    sop_instance_uid: str
    sha256: str
    version: int
    replaces: StoredVersion | None


class VersionLedger:
    """The versions the grid should assign, replayed from the index as it was before the test.

    A payload the site already holds for a SOP Instance UID (and announced) is an idempotent success
    without an event; a different one gets an event, and the indexer makes it the next version,
    replacing the current one (event schema version 2: the event itself names no version).
    """

    def __init__(self, current: dict[str, StoredVersion | None], held: dict[str, set[str]] | None = None) -> None:
        self.current = dict(current)
        self.held = {uid: set(shas) for uid, shas in (held or {}).items()}
        self.events: list[ExpectedEvent] = []
        self.versions: dict[tuple[str, str], int] = {}

    def record(self, sop_instance_uid: str, sha256: str) -> None:
        previous = self.current.get(sop_instance_uid)
        held = self.held.setdefault(sop_instance_uid, set())
        if sha256 in held or (previous is not None and previous.sha256 == sha256):
            return
        held.add(sha256)
        version = StoredVersion(sha256, previous.version + 1 if previous else 1)
        self.current[sop_instance_uid] = version
        self.versions[(sop_instance_uid, sha256)] = version.version
        self.events.append(ExpectedEvent(sop_instance_uid, sha256, version.version, previous))


def rounds(samples: list[Sample]) -> list[list[Sample]]:
    """Split the corpus so that no SOP Instance UID occurs twice in one round.

    The indexer numbers the payloads of a UID in the order they were received, asynchronously. Files
    sharing a UID go out one round apart, with the index caught up in between, so that the version
    each one gets is determined.
    """
    occurrences: Counter[str] = Counter()
    split: defaultdict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        split[occurrences[sample.instance_key]].append(sample)
        occurrences[sample.instance_key] += 1
    return [split[number] for number in range(len(split))]


def by_storescu_option(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    groups: defaultdict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[STORESCU_OPTIONS[sample.transfer_syntax]].append(sample)
    return groups


def wait_until_indexed(index: IndexReader, expected: dict[str, StoredVersion], timeout: float = 60.0) -> None:
    """Wait until the index names the expected payload as current for each UID (indexing is asynchronous)."""

    def lagging() -> list[str]:
        return sorted(
            uid for uid, version in expected.items()
            if getattr(index.instance_location(uid), "sha256", None) != version.sha256
        )

    deadline = time.monotonic() + timeout
    while (behind := lagging()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not behind, f"not indexed as expected within {timeout}s: {behind}"


def indexed_version(index: IndexReader, sop_instance_uid: str) -> StoredVersion | None:
    """The payload the index names as current for a UID, as ingest sees it."""
    row = index.instance_location(sop_instance_uid)
    return StoredVersion(row.sha256, row.version) if row else None


def indexed_shas(index: IndexReader, sop_instance_uid: str) -> set[str]:
    rows = index.db.execute("SELECT sha256 FROM instance_versions WHERE sop_instance_uid = ?", (sop_instance_uid,))
    return {row.sha256 for row in rows}


def events_from(tap: EventTap, peers: set[str]) -> list[dict[str, Any]]:
    """Events of the associations made by this test, every one of them.

    Every event is published (and acknowledged by the brokers) before its C-STORE response, so once
    storescu is done, reading the topic to its end finds the expected events and any unexpected one.
    """
    return [e for e in tap.catch_up(timeout=60) if e["source"]["peer_address"] in peers]


def _data_set(part10: bytes) -> bytes:
    return part10[split_file_meta(io.BytesIO(part10))[1] :]


def send_in_rounds(
    samples: list[Sample], site: SiteConfig, index: IndexReader
) -> tuple[list[Attempt], VersionLedger]:
    """Send every sample with storescu, one run per round and storescu option; predict the versions."""
    uids = {s.sop_instance_uid for s in samples if s.sop_instance_uid}
    ledger = VersionLedger({uid: indexed_version(index, uid) for uid in uids},
                           {uid: indexed_shas(index, uid) for uid in uids})
    attempts: list[Attempt] = []
    for number, round_ in enumerate(rounds(samples)):
        if number:
            shared = {s.sop_instance_uid for s in round_} & ledger.current.keys()
            wait_until_indexed(index, {uid: ledger.current[uid] for uid in shared if ledger.current[uid]})
        for option, group in by_storescu_option(round_).items():
            for attempt in run_storescu(group, option, site):
                attempts.append(attempt)
                if attempt.accepted:
                    ledger.record(attempt.exchange.sop_instance_uid, attempt.payload_sha256)
    return attempts, ledger


def print_summary(corpus: list[Sample], accepted: list[Attempt], refused: dict[str, Attempt],
                  skipped: dict[str, str | None]) -> None:
    reencoded = [a for a in accepted if a.exchange.data_set != _data_set(a.sample.path.read_bytes())]
    print(f"\nstorescu corpus: {len(corpus)} files, {len(accepted)} accepted ({len(reencoded)} of them "
          f"re-encoded by storescu before sending), {len(refused)} refused, {len(skipped)} skipped by storescu")
    for label, attempt in sorted(refused.items()):
        comment = attempt.exchange.error_comment if attempt.exchange else None
        print(f"  refused  {label}: {attempt.outcome}" + (f" ({comment})" if comment else ""))
    for label, reason in sorted(skipped.items()):
        print(f"  skipped  {label}: {reason}")


# -- the test -------------------------------------------------------------------------------------


def test_storescu_sends_the_pydicom_corpus(grid, taps, indexer_caught_up, metadata_dc1, metadata_dc2):
    corpus = load_corpus()
    sendable = [s for s in corpus if s.transfer_syntax in STORESCU_OPTIONS]
    skipped = {s.label: f"no storescu option proposes {s.transfer_syntax}" for s in corpus if s not in sendable}
    tap = taps()

    attempts, ledger = send_in_rounds(sendable, grid.site("A"), metadata_dc1)

    accepted = [a for a in attempts if a.accepted]
    refused = {a.sample.label: a for a in attempts if a.tried and not a.accepted}
    skipped |= {a.sample.label: a.error for a in attempts if not a.tried}
    print_summary(corpus, accepted, refused, skipped)
    unexplained = [label for label, reason in skipped.items() if reason is None]
    assert not unexplained, f"files storescu neither sent nor explained: {unexplained}"
    assert {label: a.outcome for label, a in refused.items()} == EXPECTED_REFUSALS

    # Events: one per new payload, with the version the ledger predicts, from these associations only.
    sent = {(a.exchange.sop_instance_uid, a.payload_sha256): a.sample for a in accepted}
    peers = {a.peer for a in attempts if a.tried}
    events = events_from(tap, peers)
    for event in events:
        schemas.validate_event(schemas.TOPIC_INSTANCE_STORED, event)
        sample = sent.get((event["instance"]["sop_instance_uid"], event["payload"]["sha256"]))
        assert sample is not None, f"event for a payload that was not sent as such: {event['payload']}"
        assert event["instance"]["transfer_syntax_uid"] == sample.transfer_syntax, sample.label
        assert event["site"] == "A" and event["source"]["calling_ae"] == "STORESCU"
    got = Counter((e["instance"]["sop_instance_uid"], e["payload"]["sha256"]) for e in events)
    want = Counter((e.sop_instance_uid, e.sha256) for e in ledger.events)
    assert got == want, f"unexpected events: {got - want}; missing events: {want - got}"
    print(f"  {len(events)} events ({sum(1 for e in ledger.events if e.replaces)} of them new versions), "
          f"{len(accepted) - len(events)} identical resends")

    # Payloads: the data set exactly as it came over the wire.
    blobs = BlobStore(grid.config.site_storage("A"), "A")
    for attempt in accepted:
        stored = blobs.path(attempt.payload_sha256).read_bytes()
        assert _data_set(stored) == attempt.exchange.data_set, attempt.sample.label

    # Index: every accepted payload is a version of its instance; the newest is current, in both DCs.
    final = {uid: ledger.current[uid] for uid, _ in sent}
    for store in (metadata_dc1, metadata_dc2):
        wait_until_indexed(store, final)
        for uid, version in final.items():
            assert store.instance_location(uid).version == version.version, uid
    for uid, sha256 in sent:
        assert sha256 in indexed_shas(metadata_dc2, uid), sent[(uid, sha256)].label
    # The version the indexer gave each new payload (and the one it replaced) is the ledger's.
    for (uid, sha256), version in ledger.versions.items():
        rows = metadata_dc1.db.execute(
            "SELECT version FROM instance_versions WHERE sop_instance_uid = ? AND sha256 = ?", (uid, sha256))
        assert [r.version for r in rows] == [version], sent[(uid, sha256)].label
