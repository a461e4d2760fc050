"""Bearer tokens: JWTs (EdDSA, PyJWT) with scopes, for the sites' HTTP services.

Two kinds of issuer, each with its own Ed25519 key:

* **the grid** (``dicomgrid token issue``): tokens for people and systems, with any of
  :data:`SCOPES`, for every site or one (``--site``). Issuer ``dicomgrid:<grid>``.
* **each site**, for its own requests to another site's payload endpoint: scope ``replicate`` only,
  addressed to that one site, a few minutes long (:class:`PeerTokens`). Issuer
  ``dicomgrid:<grid>:site:<name>``, verified with that site's public key, so a site's credential cannot
  speak for another site, and one site's key does not open any other endpoint.

A site accepts a token whose audience is the grid or itself. Scopes (space-separated ``scope`` claim):

=============  ====================================================================
``read``       QIDO-RS, WADO-RS, WADO-URI, the DICOMweb root
``write``      STOW-RS
``replicate``  the payload transfer endpoint (``/internal/payloads``)
``audit``      paths under ``/audit`` (reserved for audit queries over HTTP; none is served yet)
=============  ====================================================================
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dicomgrid.core.config import GridConfig
from dicomgrid.core.pki import load_private_key, load_public_key

SCOPES = ("read", "write", "replicate", "audit")
ALGORITHM = "EdDSA"
# Clock skew tolerated between the sites' hosts.
LEEWAY_S = 30.0
GRID_KEY_ID = "grid"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class InvalidToken(Exception):
    """A token that cannot be accepted; ``reason`` says why (never the token itself)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_duration(text: str) -> float:
    """Seconds of ``90``, ``90s``, ``15m``, ``12h`` or ``30d``."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 900, 15m, 12h, 30d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def grid_issuer(config: GridConfig) -> str:
    return f"dicomgrid:{config.name}"


def site_issuer(config: GridConfig, site: str) -> str:
    return f"dicomgrid:{config.name}:site:{site}"


def site_audience(config: GridConfig, site: str) -> str:
    return site_issuer(config, site)


@dataclass(frozen=True)
class Principal:
    """Who a verified token speaks for."""

    subject: str
    scopes: frozenset[str]
    token_id: str
    site: str | None = None  # the peer site, for a site's own token

    @property
    def user_id(self) -> str:
        return f"site:{self.site}" if self.site else self.subject


def _encode(key: Ed25519PrivateKey, key_id: str, claims: dict[str, object]) -> str:
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": key_id})


def issue(config: GridConfig, scopes: list[str], *, subject: str, ttl_s: float, site: str | None = None,
          key: Ed25519PrivateKey | None = None) -> str:
    """A grid token with ``scopes`` for ``subject``, for every site or only ``site``."""
    unknown = set(scopes) - set(SCOPES)
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(sorted(unknown)) or 'none'}")
    if ttl_s <= 0 or ttl_s > config.security.max_token_ttl_s:
        raise ValueError(f"token lifetime must be between 0 and {config.security.max_token_ttl_s:.0f} s")
    if site is not None:
        config.site(site)
    now = int(time.time())
    claims = {
        "iss": grid_issuer(config),
        "sub": subject,
        "aud": site_audience(config, site) if site else grid_issuer(config),
        "iat": now,
        "nbf": now,
        "exp": now + int(ttl_s),
        "jti": str(uuid.uuid4()),
        "scope": " ".join(dict.fromkeys(scopes)),
    }
    return _encode(key or load_private_key(config.token_key_files[0]), GRID_KEY_ID, claims)


class PeerTokens:
    """The tokens one site signs for its requests to other sites' payload endpoints (cached until half
    their lifetime has passed)."""

    def __init__(self, config: GridConfig, site: str) -> None:
        self.config = config
        self.site = site
        self._key: Ed25519PrivateKey | None = None
        self._cache: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def for_site(self, peer: str) -> str:
        ttl = self.config.security.peer_token_ttl_s
        now = time.time()
        with self._lock:
            cached = self._cache.get(peer)
            if cached is not None and cached[0] > now:
                return cached[1]
            if self._key is None:
                self._key = load_private_key(self.config.site_token_key_files(self.site)[0])
            claims = {
                "iss": site_issuer(self.config, self.site),
                "sub": f"site:{self.site}",
                "aud": site_audience(self.config, peer),
                "iat": int(now),
                "nbf": int(now),
                "exp": int(now + ttl),
                "jti": str(uuid.uuid4()),
                "scope": "replicate",
            }
            token = _encode(self._key, f"site:{self.site}", claims)
            self._cache[peer] = (now + ttl / 2, token)
            return token


class TokenVerifier:
    """Checks the tokens presented to one site: the grid's, and the other sites' own."""

    def __init__(self, config: GridConfig, site: str) -> None:
        self.config = config
        self.site = site
        self._grid_key: Ed25519PublicKey = load_public_key(config.token_key_files[1])
        self._site_keys: dict[str, Ed25519PublicKey] = {
            s.name: load_public_key(config.site_token_key_files(s.name)[1]) for s in config.sites if s.name != site
        }
        self._audiences = [grid_issuer(config), site_audience(config, site)]

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("not a JWT") from exc
        key_id = header.get("kid")
        if header.get("alg") != ALGORITHM:
            raise InvalidToken("unexpected signing algorithm")
        peer_site: str | None = None
        if key_id == GRID_KEY_ID:
            key, issuer, audiences = self._grid_key, grid_issuer(self.config), self._audiences
        elif isinstance(key_id, str) and key_id.startswith("site:") and key_id[5:] in self._site_keys:
            peer_site = key_id[5:]
            key, issuer = self._site_keys[peer_site], site_issuer(self.config, peer_site)
            audiences = [site_audience(self.config, self.site)]
        else:
            raise InvalidToken("unknown signing key")
        try:
            claims = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=audiences, issuer=issuer, leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "scope"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("token expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken("token is for another grid or site") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"token rejected ({type(exc).__name__})") from exc
        scopes = frozenset(str(claims.get("scope", "")).split())
        if peer_site is not None and scopes - {"replicate"}:
            raise InvalidToken("a site's own token may only carry the replicate scope")
        return Principal(str(claims["sub"])[:128], scopes & set(SCOPES), str(claims.get("jti", ""))[:64], peer_site)
