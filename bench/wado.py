"""A WADO-RS client for the benchmark: one study (or instance) as ``multipart/related; application/dicom``.

The body is streamed and only counted (bytes, and parts by their boundary delimiters), never held in
memory, so the time is the archive's and the network's, not the client's. ``Accept-Encoding: identity``:
archives that would compress the answer (Orthanc does by default when asked) must not spend the run on
gzip, and the grid never compresses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

ACCEPT = 'multipart/related; type="application/dicom"'
CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class WadoResult:
    seconds: float  # from sending the request until the last byte of the body
    status: int
    bytes: int  # body bytes (multipart framing included)
    parts: int  # DICOM instances in the body


class PartCounter:
    """Counts the parts of a multipart body fed in arbitrary chunks (a delimiter may span two chunks)."""

    def __init__(self, boundary: str) -> None:
        self.delimiter = b"--" + boundary.encode()
        self.delimiters = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk
        self.delimiters += data.count(self.delimiter)
        # Keep what could be the start of a delimiter cut by the chunk boundary (never a whole one).
        self._tail = data[-(len(self.delimiter) - 1):]

    @property
    def parts(self) -> int:
        """Parts between the first delimiter and the closing one."""
        return max(0, self.delimiters - 1)


def boundary_of(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"')
    raise ValueError(f"no boundary in Content-Type {content_type!r}")


def client() -> httpx.Client:
    """One keep-alive connection pool per target; no proxies from the environment on loopback."""
    return httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0), trust_env=False,
                        headers={"Accept": ACCEPT, "Accept-Encoding": "identity"})


def retrieve(http: httpx.Client, url: str) -> WadoResult:
    """GET ``url`` and stream its body through a :class:`PartCounter`; a non-200 answer has no parts."""
    started = time.perf_counter()
    with http.stream("GET", url) as response:
        if response.status_code != 200:
            response.read()
            return WadoResult(time.perf_counter() - started, response.status_code, len(response.content), 0)
        counter = PartCounter(boundary_of(response.headers["content-type"]))
        size = 0
        for chunk in response.iter_raw(CHUNK_BYTES):
            counter.feed(chunk)
            size += len(chunk)
    return WadoResult(time.perf_counter() - started, response.status_code, size, counter.parts)
