"""Trials in Cassandra: definition, called AE title, members and pseudonym key (schemas/cql/006_trials.cql).

The key is generated at creation (32 random bytes) or supplied, for a trial that spans several grids,
which then all derive the same pseudonyms. It is stored wrapped with AES-256-GCM under a key derived
(HKDF-SHA256) from ``security.trial_key_secret``, with the trial's name as associated data, so neither a
copy of the keyspace nor a row moved to another trial yields a usable key. A :class:`Trial` never shows
its key in ``repr`` or in :meth:`Trial.summary`, which is what the CLI prints and logs carry.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.config import GridConfig, _check_ae_title
from dicomgrid.core.uids import is_valid_uid
from dicomgrid.trials.profile import check_options
from dicomgrid.trials.pseudonyms import MIN_KEY_BYTES, Pseudonyms

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
KINDS = ("patient", "study")
KEY_BYTES = 32


class TrialError(ValueError):
    """A trial that cannot be created or changed as asked."""


@dataclass(frozen=True)
class Trial:
    name: str
    ae_title: str
    options: tuple[str, ...]
    allow_identifying_pixels: bool
    key_fingerprint: str
    created_at: dt.datetime | None
    key: bytes = field(repr=False, compare=False)

    def pseudonyms(self) -> Pseudonyms:
        return Pseudonyms(self.key, self.name)

    def summary(self) -> dict[str, Any]:
        """What may be shown of a trial: everything but its key."""
        return {
            "name": self.name,
            "ae_title": self.ae_title,
            "options": list(self.options),
            "allow_identifying_pixels": self.allow_identifying_pixels,
            "key_fingerprint": self.key_fingerprint,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


@dataclass(frozen=True)
class Members:
    patients: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise TrialError(f"invalid trial name {name!r}: 1-32 letters, digits, '-' or '_', starting with a letter or digit")
    return name


def check_members(patients: Iterable[str], studies: Iterable[str]) -> Members:
    patients = tuple(dict.fromkeys(p.strip() for p in patients))
    studies = tuple(dict.fromkeys(s.strip() for s in studies))
    if any(not p or len(p) > 64 or "\\" in p for p in patients):
        raise TrialError("a Patient ID is 1-64 characters without a backslash")
    bad = next((s for s in studies if not is_valid_uid(s)), None)
    if bad is not None:
        raise TrialError(f"{bad[:64]!r} is not a valid Study Instance UID")
    return Members(patients, studies)


def parse_key(data: bytes) -> bytes:
    """A supplied key: hex text, or raw bytes; at least 32 bytes either way."""
    text = data.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = data
    if len(key) < MIN_KEY_BYTES:
        raise TrialError(f"a trial key has at least {MIN_KEY_BYTES} bytes (or {2 * MIN_KEY_BYTES} hex digits)")
    return key


class KeyWrap:
    """AES-256-GCM under a key derived from the grid's ``trial_key_secret``."""

    def __init__(self, secret: str) -> None:
        kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"dicomgrid trial key wrap").derive(
            secret.encode("utf-8"))
        self._aead = AESGCM(kek)

    def wrap(self, trial: str, key: bytes) -> tuple[bytes, bytes]:
        nonce = secrets.token_bytes(12)
        return nonce, self._aead.encrypt(nonce, key, trial.encode("utf-8"))

    def unwrap(self, trial: str, nonce: bytes, wrapped: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, wrapped, trial.encode("utf-8"))
        except InvalidTag:
            raise TrialError(f"the key of trial {trial} cannot be unwrapped: security.trial_key_secret differs "
                             "from the one it was stored with") from None


def _applied(result: Any) -> bool:
    # The grid's row factory is one the driver's ``was_applied`` refuses; an LWT answers "[applied]" first.
    # Serial consistency stays SERIAL (all datacenters): names and AE titles are unique grid-wide.
    row = result.one()
    return bool(row[0]) if row is not None else False


class TrialStore:
    def __init__(self, db: Cassandra, config: GridConfig) -> None:
        self.db = db
        self.config = config
        self._wrap = KeyWrap(config.security.trial_key())

    # -- writes -------------------------------------------------------------------------------------

    def create(self, name: str, ae_title: str, options: Iterable[str], members: Members, *,
               key: bytes | None = None, allow_identifying_pixels: bool = False) -> Trial:
        check_name(name)
        try:
            ae_title = _check_ae_title(ae_title)
        except ValueError as exc:
            raise TrialError(str(exc)) from None
        if ae_title in {site.ae_title for site in self.config.sites}:
            raise TrialError(f"AE title {ae_title} is a site's own AE title")
        options = check_options(tuple(options))
        if not (members.patients or members.studies):
            raise TrialError("a trial needs at least one --patient or --study")
        key = key if key is not None else secrets.token_bytes(KEY_BYTES)
        fingerprint = Pseudonyms(key, name).fingerprint()
        now = dt.datetime.now(dt.timezone.utc)
        created = self.db.execute(
            "INSERT INTO trials (name, ae_title, options, allow_identifying_pixels, key_fingerprint, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            (name, ae_title, list(options), allow_identifying_pixels, fingerprint, now),
        )
        if not _applied(created):
            raise TrialError(f"a trial named {name} exists already")
        claimed = self.db.execute("INSERT INTO trial_ae_titles (ae_title, trial) VALUES (?, ?) IF NOT EXISTS",
                                  (ae_title, name))
        if not _applied(claimed):
            self.db.execute("DELETE FROM trials WHERE name = ?", (name,))
            owner = self.db.execute("SELECT trial FROM trial_ae_titles WHERE ae_title = ?", (ae_title,)).one()
            raise TrialError(f"AE title {ae_title} is used by trial {owner.trial if owner else '(unknown)'}")
        nonce, wrapped = self._wrap.wrap(name, key)
        self.db.execute("INSERT INTO trial_keys (trial, nonce, wrapped) VALUES (?, ?, ?)", (name, nonce, wrapped))
        self.add(name, members)
        return Trial(name, ae_title, options, allow_identifying_pixels, fingerprint, now, key)

    def add(self, name: str, members: Members) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        for kind, values in (("patient", members.patients), ("study", members.studies)):
            for value in values:
                self.db.execute("INSERT INTO trial_members (trial, kind, value, added_at) VALUES (?, ?, ?, ?)",
                                (name, kind, value, now))

    def remove(self, name: str, members: Members) -> None:
        for kind, values in (("patient", members.patients), ("study", members.studies)):
            for value in values:
                self.db.execute("DELETE FROM trial_members WHERE trial = ? AND kind = ? AND value = ?",
                                (name, kind, value))

    # -- reads --------------------------------------------------------------------------------------

    def get(self, name: str) -> Trial | None:
        row = self.db.execute("SELECT * FROM trials WHERE name = ?", (name,)).one()
        return None if row is None else self._trial(row)

    def by_ae(self, ae_title: str) -> Trial | None:
        row = self.db.execute("SELECT trial FROM trial_ae_titles WHERE ae_title = ?", (ae_title,)).one()
        trial = None if row is None else self.get(row.trial)
        return trial if trial is not None and trial.ae_title == ae_title else None

    def names(self) -> list[str]:
        return sorted(row.name for row in self.db.execute("SELECT name FROM trials"))

    def members(self, name: str) -> Members:
        rows = list(self.db.execute("SELECT kind, value FROM trial_members WHERE trial = ?", (name,)))
        return Members(tuple(r.value for r in rows if r.kind == "patient"),
                       tuple(r.value for r in rows if r.kind == "study"))

    def _trial(self, row: Any) -> Trial:
        key_row = self.db.execute("SELECT nonce, wrapped FROM trial_keys WHERE trial = ?", (row.name,)).one()
        if key_row is None:
            raise TrialError(f"trial {row.name} has no key (its creation did not finish)")
        key = self._wrap.unwrap(row.name, key_row.nonce, key_row.wrapped)
        return Trial(row.name, row.ae_title, tuple(row.options or ()), bool(row.allow_identifying_pixels),
                     row.key_fingerprint, row.created_at, key)


class TrialDirectory:
    """The trials as a site's services see them: looked up by AE title or name, cached for ``ttl_s``.

    A trial created or changed while the services run is served within ``ttl_s`` (misses are cached too,
    so an association to an unknown AE title costs at most one read per ``ttl_s``).
    """

    def __init__(self, store: TrialStore, ttl_s: float = 2.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[float, Trial | None]] = {}

    def _cached(self, kind: str, value: str, load: Any) -> Trial | None:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((kind, value))
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        trial = load(value)
        with self._lock:
            self._cache[(kind, value)] = (now, trial)
        return trial

    def by_ae(self, ae_title: str) -> Trial | None:
        return self._cached("ae", ae_title.strip(), self.store.by_ae)

    def by_name(self, name: str) -> Trial | None:
        return self._cached("name", name, self.store.get) if NAME.fullmatch(name) else None
