"""How the indexer's writes become requests (core.cassandra.PartitionWrites), with stand-in statements
and replica maps: one request per partition, except partitions whose replicas are the same."""

from __future__ import annotations

import zlib

from dicomgrid.core.cassandra import MAX_PARTITIONS_PER_REQUEST, PartitionWrites


def _instance_writes(writes: PartitionWrites, n: int) -> None:
    """What the indexer adds for ``n`` instances of one study: two rows by SOP Instance UID, beside the
    payload's replica row (by digest), and the study's partition with a row per instance."""
    for i in range(n):
        writes.add(f"sop-{i}", (f"version {i}", (f"sop-{i}",)), (f"location {i}", (f"sop-{i}",)), beside=f"sha-{i}")
        writes.add(f"sha-{i}", (f"replica {i}", (f"sha-{i}",)))
        writes.add("study", (f"instance row {i}", ("study",)))
    writes.add("study", ("series row", ("study",)), ("study row", ("study",)))


def _key(write) -> str:
    return write[1][0]


def _requests(writes: PartitionWrites, replicas_of) -> list[list]:
    """The requests, each as the list of its writes (a batch is made a list by ``batch=list``)."""
    out = []
    for request in writes.statements(replicas_of, batch=list):
        batched = isinstance(request[0], list) and request[1] is None
        out.append(request[0] if batched else [request])
    return out


def test_partitions_held_by_the_same_replicas_share_requests_up_to_the_limit():
    writes = PartitionWrites()
    _instance_writes(writes, 10)
    requests = _requests(writes, lambda write: frozenset({"node-dc1", "node-dc2"}))

    sent = [w for request in requests for w in request]
    assert sorted(sent) == sorted(w for group in writes._groups.values() for w in group), "each write once"
    study = [r for r in requests if any(_key(w) == "study" for w in r)]
    assert len(study) == 1 and {_key(w) for w in study[0]} == {"study"}, "the study's big partition alone"
    small = [r for r in requests if r not in study]
    partitions = [len({_key(w) for w in r}) for r in small]
    assert partitions == [8, 8, 4]  # 20 partitions (10 instances), in 3 requests instead of 10
    assert max(partitions) <= MAX_PARTITIONS_PER_REQUEST
    for request in small:  # an instance's rows stay together
        keys = {_key(w) for w in request}
        assert all((f"sha-{k[4:]}" in keys) for k in keys if k.startswith("sop-"))


def test_partitions_on_different_replicas_are_never_in_one_request():
    nodes = ["n1", "n2", "n3"]

    def replicas_of(write):  # a three-node datacenter, replication factor 2
        first = zlib.crc32(_key(write).encode()) % 3
        return frozenset({nodes[first], nodes[(first + 1) % 3]})

    writes = PartitionWrites()
    _instance_writes(writes, 30)
    for request in _requests(writes, replicas_of):
        assert len({replicas_of(w) for w in request}) == 1
        assert len({_key(w) for w in request}) <= MAX_PARTITIONS_PER_REQUEST


def test_without_a_replica_map_or_when_the_driver_cannot_tell_each_partition_is_its_own_request():
    for replicas_of in (None, lambda write: frozenset()):
        writes = PartitionWrites()
        _instance_writes(writes, 5)
        requests = _requests(writes, replicas_of)
        assert all(len({_key(w) for w in r}) == 1 for r in requests)
        assert len(requests) == 5 * 2 + 1
