"""Two sites' blob stores and a real HTTPS payload endpoint for site B, for the payload unit tests.

The ledger and the audit trail are stand-ins; the endpoint runs in uvicorn on a free port, with the
development TLS certificates and token keys made for the test's own grid, behind the site's token check.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from dicomgrid.core.blobstore import BlobRef, BlobStore
from dicomgrid.core.config import GridConfig, load_config
from dicomgrid.core.index_reader import StoredInstance
from dicomgrid.core.pki import ensure_material
from dicomgrid.core.site import SiteContext
from dicomgrid.core.tls import http_verify, uvicorn_ssl
from dicomgrid.core.tokens import PeerTokens
from dicomgrid.core.transfer_endpoint import TransferEndpoint
from dicomgrid.http import guarded_protocol, protect
from tests.grid import free_port


@dataclass
class FakeLedger:
    """The `replicas` ledger as the payload layer reads it."""

    copies: dict[str, list[str]] = field(default_factory=dict)

    recorded: list[tuple[str, str, int]] = field(default_factory=list)

    def replicas(self, digest: str) -> list[Any]:
        return [SimpleNamespace(site=s) for s in self.copies.get(digest, [])]

    def record(self, blob: BlobRef) -> None:
        self.recorded.append((blob.site, blob.sha256, blob.size))
        self.copies.setdefault(blob.sha256, []).append(blob.site)

    def verified_sites(self, digest: str) -> set[str]:
        return set(self.copies.get(digest, []))

    def mark_verified(self, blob: BlobRef) -> None:
        if blob.site not in self.copies.get(blob.sha256, []):
            self.record(blob)


@dataclass
class RecordingAudit:
    """What the site audited. Collected transfers (core.transfer_audit) are published whenever the
    records are looked at, as the resend loop and the end of a process do."""

    recorded: list[dict[str, Any]] = field(default_factory=list)
    collectors: list[Any] = field(default_factory=list)

    @property
    def records(self) -> list[dict[str, Any]]:
        for collector in self.collectors:
            collector.flush()
        return self.recorded

    def record(self, action, event, outcome, description, participants, objects=(), supersedes=()) -> dict[str, Any]:
        entry = {"action": action, "event": event, "outcome": outcome, "description": description,
                 "objects": [(o.type, o.id) for o in objects]}
        self.recorded.append(entry)
        return entry

    def hold(self, *args: Any, **kwargs: Any) -> None:
        return None  # no spool

    def watch(self, collector: Any) -> None:
        self.collectors.append(collector)


def site_config(tmp_path: Path, ports: dict[str, int]) -> GridConfig:
    sites = "".join(
        f'[[sites]]\nname = "{name}"\nae_title = "GRID_{name}"\ndicom_port = {free_port()}\n'
        f'http_port = {port}\nstorage_root = "{tmp_path / name}"\ncassandra_dc = "dc1"\n'
        f'replicate_to = {[other for other in ports if other != name]!r}\n'.replace("'", '"')
        for name, port in ports.items()
    )
    path = tmp_path / "grid.toml"
    path.write_text(f'name = "unit"\ndata_dir = "{tmp_path}"\n{sites}')
    config = load_config(path)
    ensure_material(config)
    return config


def peer_auth(config: GridConfig, caller: str = "A", callee: str = "B") -> dict[str, str]:
    """The Authorization header of site ``caller``'s request to site ``callee``'s payload endpoint."""
    return {"Authorization": f"Bearer {PeerTokens(config, caller).for_site(callee)}"}


def https(config: GridConfig) -> httpx.Client:
    """An HTTP client that trusts the test grid's CA."""
    return httpx.Client(verify=http_verify(config), timeout=30)


def site_context(config: GridConfig, name: str, ledger: FakeLedger) -> SiteContext:
    blobs = BlobStore(config.site_storage(name), name)
    site = SiteContext(config, config.site(name), None, blobs, RecordingAudit())  # type: ignore[arg-type]
    site.ledger = ledger  # type: ignore[assignment]
    return site


class PeerServer:
    """A site's HTTP service with only the payload endpoint (or ``routes``), on a real socket."""

    def __init__(self, site: SiteContext, routes: list[Any] | None = None) -> None:
        app = Starlette(routes=routes if routes is not None else TransferEndpoint(site).routes())
        self.server = uvicorn.Server(uvicorn.Config(
            protect(app, site), host="127.0.0.1", port=site.site.http_port, log_config=None, access_log=False,
            http=guarded_protocol(site.config.connections), **uvicorn_ssl(site.config, site.site.name),
        ))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "PeerServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "peer server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@dataclass
class TwoSites:
    a: SiteContext
    b: SiteContext
    ledger: FakeLedger
    http: httpx.Client
    server: PeerServer | None = None  # site B's

    @property
    def auth(self) -> dict[str, str]:
        """What site A presents to site B's payload endpoint."""
        return peer_auth(self.a.config)

    def url(self, digest: str) -> str:
        return f"{self.b.config.http_url('B')}/internal/payloads/{digest}"

    def put(self, site: SiteContext, data: bytes) -> str:
        digest = site.blobs.put_bytes(data).sha256
        self.ledger.copies.setdefault(digest, []).append(site.site.name)
        return digest


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[TwoSites]:
    ledger = FakeLedger()
    config = site_config(tmp_path, {"A": free_port(), "B": free_port()})
    a, b = site_context(config, "A", ledger), site_context(config, "B", ledger)
    with PeerServer(b) as server, https(config) as client:
        yield TwoSites(a, b, ledger, client, server)


def corrupt(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))




def instance(digest: str) -> StoredInstance:
    """An indexed instance whose payload is ``digest``."""
    return StoredInstance("1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1", digest)
