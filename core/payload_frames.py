"""The body of a batch payload transfer: several payloads in one response, each framed by a header.

``POST /internal/payloads`` (:class:`~dicomgrid.core.transfer_endpoint.TransferEndpoint`) answers one
frame per digest asked for, in the order asked::

    {"sha256": "<digest>", "status": 200, "size": <n>}\\n<n bytes of the payload>
    {"sha256": "<digest>", "status": 404, "error": "no local copy"}\\n

A header is one line of JSON. ``status`` is what a request for that payload alone would have been
answered (200, or 404 for no intact copy); 413 says that the payload is larger than a batch carries
(:data:`FRAME_MAX_BYTES`) and is to be fetched on its own, where a cut transfer can resume. Each
payload is checked against its digest before its frame goes out, and the receiver checks it again
before it names the copy, so a frame carries no checksum of its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MEDIA_TYPE = "application/vnd.dicomgrid.payloads"
# A payload larger than this goes on its own (resumable, streamed); smaller ones are read whole.
FRAME_MAX_BYTES = 1 << 20
# A header is a digest, a status and a size or a short error: anything longer is not one.
HEADER_MAX_BYTES = 1024


class FrameError(ValueError):
    """The body breaks the frame format (a peer that is not a grid site, or a cut-off body)."""


@dataclass(frozen=True)
class Frame:
    sha256: str
    status: int
    body: bytes = b""
    error: str = ""


def encode(sha256: str, status: int, body: bytes = b"", error: str = "") -> bytes:
    head: dict[str, object] = {"sha256": sha256, "status": status}
    if status == 200:
        head["size"] = len(body)
    else:
        head["error"] = error[:200]
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + body


class FrameReader:
    """Frames from the chunks of a body, as they arrive; checks them against the digests asked for."""

    def __init__(self, asked: Iterable[str], max_bytes: int = FRAME_MAX_BYTES) -> None:
        self._asked = list(asked)
        self._next = 0
        self._max = max_bytes
        self._buf = bytearray()
        self._head: dict[str, object] | None = None

    @property
    def pending(self) -> list[str]:
        """The digests asked for whose frame has not come yet."""
        return self._asked[self._next:]

    def feed(self, chunk: bytes) -> Iterator[Frame]:
        self._buf += chunk
        while True:
            if self._head is None:
                end = self._buf.find(b"\n", 0, HEADER_MAX_BYTES + 1)
                if end < 0:
                    if len(self._buf) > HEADER_MAX_BYTES:
                        raise FrameError("frame header too long")
                    return
                self._head = self._header(bytes(self._buf[:end]))
                del self._buf[:end + 1]
            head = self._head
            size = int(head.get("size", 0))  # type: ignore[call-overload]
            if len(self._buf) < size:
                return
            body = bytes(self._buf[:size])
            del self._buf[:size]
            self._head = None
            self._next += 1
            yield Frame(str(head["sha256"]), int(head["status"]), body, str(head.get("error", "")))  # type: ignore[call-overload]

    def close(self) -> None:
        """The body ended: anything left half-way is a cut."""
        if self._head is not None or self._buf:
            raise FrameError("body ended inside a frame")

    def _header(self, line: bytes) -> dict[str, object]:
        try:
            head = json.loads(line)
        except ValueError as exc:
            raise FrameError("frame header is not JSON") from exc
        if not isinstance(head, dict):
            raise FrameError("frame header is not an object")
        if self._next >= len(self._asked) or head.get("sha256") != self._asked[self._next]:
            raise FrameError("frame for a payload not asked for, or out of order")
        status, size = head.get("status"), head.get("size", 0)
        if not isinstance(status, int) or not isinstance(size, int) or isinstance(size, bool):
            raise FrameError("frame header without an integer status and size")
        if status != 200 and size:
            raise FrameError("only a 200 frame carries a payload")
        if not 0 <= size <= self._max:
            raise FrameError(f"frame of {size} bytes exceeds {self._max}")
        return head
