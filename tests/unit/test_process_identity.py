"""What a process names its files and events by, and that a forked child never shares it: the temp
files' process tag (core.processes.own_tag) and the random event ids (core.events.new_event_id)."""

from __future__ import annotations

import os
import re
import uuid

from dicomgrid.core.events import envelope, new_event_id
from dicomgrid.core.processes import own_tag, tag_alive


def _in_child(produce) -> str:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once
        try:
            os.write(write, produce().encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        out = b""
        while chunk := os.read(read, 4096):
            out += chunk
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    return out.decode()


def test_a_forked_child_has_its_own_tag_and_the_parent_keeps_its_own() -> None:
    mine = own_tag()
    assert mine.startswith(f"{os.getpid()}-") and tag_alive(mine)
    child = _in_child(own_tag)
    assert child != mine and not child.startswith(f"{os.getpid()}-")
    assert own_tag() == mine


def test_event_ids_are_version_4_uuids_and_never_repeat() -> None:
    ids = [new_event_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:100]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text
    assert re.fullmatch(r"[0-9a-f-]{36}", envelope("dicom.audit")["event_id"])


def test_a_forked_child_draws_other_event_ids_than_its_parent() -> None:
    child = _in_child(lambda: ",".join(new_event_id() for _ in range(50))).split(",")
    parent = [new_event_id() for _ in range(50)]
    assert len(child) == 50 and not set(child) & set(parent)
