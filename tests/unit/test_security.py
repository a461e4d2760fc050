"""Tokens, secrets in the config, the production refusal, and what Kafka and Cassandra clients are given."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from dicomgrid.cli import main
from dicomgrid.core import pki
from dicomgrid.core.cassandra import security_options
from dicomgrid.core.config import load_config
from dicomgrid.core.production import refusal
from dicomgrid.core.tokens import InvalidToken, PeerTokens, TokenVerifier, issue, parse_duration
from dicomgrid.http import protect, required_scope
from dicomgrid.processors.app import _credentials
from tests.unit.peer_sites import RecordingAudit, site_config

SECRET = "s3cret-value-never-shown"


@pytest.fixture
def grid(tmp_path: Path):
    """A three-site grid (no services) with its development key material."""
    return site_config(tmp_path, {"A": 1, "B": 2, "C": 3})


# -- tokens -------------------------------------------------------------------------------------------


def test_a_grid_token_carries_its_scopes_and_names_its_subject(grid):
    token = issue(grid, ["read", "audit"], subject="alice", ttl_s=60)
    principal = TokenVerifier(grid, "A").verify(token)
    assert principal.scopes == {"read", "audit"} and principal.subject == "alice" and principal.site is None
    with pytest.raises(ValueError, match="scopes must be"):
        issue(grid, ["admin"], subject="alice", ttl_s=60)
    with pytest.raises(ValueError, match="lifetime"):
        issue(grid, ["read"], subject="alice", ttl_s=10 * 366 * 86400)


def test_a_token_for_one_site_is_refused_by_the_others(grid):
    token = issue(grid, ["read"], subject="alice", ttl_s=60, site="B")
    assert TokenVerifier(grid, "B").verify(token).scopes == {"read"}
    with pytest.raises(InvalidToken, match="another grid or site"):
        TokenVerifier(grid, "A").verify(token)


def test_expired_tokens_are_refused(grid):
    key = pki.load_private_key(grid.token_key_files[0])
    now = int(time.time())
    claims = {"iss": f"dicomgrid:{grid.name}", "aud": f"dicomgrid:{grid.name}", "sub": "alice", "scope": "read",
              "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}
    token = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": "grid"})
    with pytest.raises(InvalidToken, match="expired"):
        TokenVerifier(grid, "A").verify(token)


def test_a_token_signed_with_another_key_is_refused(grid):
    stranger = Ed25519PrivateKey.generate()
    forged = issue(grid, ["read", "write", "replicate", "audit"], subject="mallory", ttl_s=60, key=stranger)
    with pytest.raises(InvalidToken, match="InvalidSignature"):
        TokenVerifier(grid, "A").verify(forged)
    # Neither does an unsigned token or one with a symmetric algorithm get through.
    for algorithm, secret in (("HS256", "x" * 32),):
        token = jwt.encode({"sub": "m", "scope": "read"}, secret, algorithm=algorithm, headers={"kid": "grid"})
        with pytest.raises(InvalidToken, match="algorithm"):
            TokenVerifier(grid, "A").verify(token)
    with pytest.raises(InvalidToken, match="not a JWT"):
        TokenVerifier(grid, "A").verify("not-a-token")


def test_each_site_signs_its_own_peer_tokens_and_cannot_speak_for_another(grid):
    from_a = PeerTokens(grid, "A").for_site("B")
    principal = TokenVerifier(grid, "B").verify(from_a)
    assert principal.site == "A" and principal.scopes == {"replicate"} and principal.user_id == "site:A"
    # Addressed to B: C does not accept it.
    with pytest.raises(InvalidToken, match="another grid or site"):
        TokenVerifier(grid, "C").verify(from_a)
    # Site C signs a token claiming to be site A (key id, issuer and subject of A, C's key): refused.
    c_key = pki.load_private_key(grid.site_token_key_files("C")[0])
    claims = jwt.decode(from_a, options={"verify_signature": False})
    forged = jwt.encode(claims, c_key, algorithm="EdDSA", headers={"kid": "site:A"})
    with pytest.raises(InvalidToken, match="InvalidSignature"):
        TokenVerifier(grid, "B").verify(forged)
    # A site's own key cannot mint wider scopes for itself.
    a_key = pki.load_private_key(grid.site_token_key_files("A")[0])
    wider = jwt.encode({**claims, "scope": "replicate read"}, a_key, algorithm="EdDSA", headers={"kid": "site:A"})
    with pytest.raises(InvalidToken, match="only carry the replicate scope"):
        TokenVerifier(grid, "B").verify(wider)


def test_durations():
    assert [parse_duration(t) for t in ("90", "15m", "12h", "30d")] == [90, 900, 43200, 30 * 86400]
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_scopes_of_the_site_paths():
    assert required_scope("GET", "/health") is None
    assert required_scope("GET", "/dicomweb/studies") == "read"
    assert required_scope("GET", "/wado") == "read"
    assert required_scope("GET", "/trials/T1/dicomweb/studies") == "read"
    assert required_scope("POST", "/dicomweb/studies") == "write"
    assert required_scope("POST", "/dicomweb/studies/1.2.3") == "write"
    assert required_scope("GET", "/internal/payloads/" + "0" * 64) == "replicate"
    assert required_scope("POST", "/internal/payloads") == "replicate"  # a batch of payloads


def test_401_and_403_are_answered_and_audited(grid):
    audit = RecordingAudit()
    site = SimpleNamespace(config=grid, site=grid.site("A"), audit=audit)

    async def ok(request):
        return PlainTextResponse(request.state.principal.subject)

    app = protect(Starlette(routes=[Route("/dicomweb/studies", ok, methods=["GET", "POST"])]), site)  # type: ignore[arg-type]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:  # type: ignore[arg-type]
            reader = {"Authorization": "Bearer " + issue(grid, ["read"], subject="alice", ttl_s=60)}
            return [await c.get("/dicomweb/studies"),
                    await c.get("/dicomweb/studies", headers={"Authorization": "Bearer garbage"}),
                    await c.post("/dicomweb/studies", headers=reader),
                    await c.get("/dicomweb/studies", headers=reader)]

    missing, bad, wrong_scope, good = asyncio.run(run())
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert bad.status_code == 401 and "invalid_token" in bad.headers["www-authenticate"]
    assert wrong_scope.status_code == 403 and 'scope="write"' in wrong_scope.headers["www-authenticate"]
    assert good.status_code == 200 and good.text == "alice"
    assert [(r["event"], r["outcome"]) for r in audit.records] == [
        ("User Authentication", 4), ("User Authentication", 4), ("Security Alert", 4)]
    assert "write scope" in audit.records[2]["description"]


# -- secrets in the config ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _data_dir_from_the_file(monkeypatch):
    # The environment's data_dir would win over the one these configs name (and a developer's shell
    # or a CI job may set it).
    monkeypatch.delenv("DICOMGRID_DATA_DIR", raising=False)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(f'data_dir = "{tmp_path}"\n' + text)
    return path


def test_secrets_come_from_files_or_the_environment_and_are_never_shown(tmp_path: Path, monkeypatch):
    (tmp_path / "kafka-password").write_text(SECRET + "\n")
    config_file = _write(tmp_path, (
        '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-512"\nsasl_username = "grid"\n'
        'sasl_password_file = "kafka-password"\nssl_ca_location = "kafka-ca.pem"\n'
        '[cassandra]\nusername = "grid"\n'))
    monkeypatch.setenv("DICOMGRID_CASSANDRA__PASSWORD", SECRET)
    monkeypatch.setenv("DICOMGRID_SECURITY__TRIAL_KEY_SECRET", SECRET + "-trial")
    config = load_config(config_file)
    assert config.kafka.password() == SECRET and config.cassandra.secret_password() == SECRET
    assert config.security.trial_key() == SECRET + "-trial"
    assert config.kafka.sasl_password_file == tmp_path / "kafka-password"  # relative to data_dir
    for shown in (repr(config), str(config), config.model_dump_json(), json.dumps(config.model_dump(mode="json"))):
        assert SECRET not in shown
    for args in (["config", "show"], ["config", "show", "--json"]):
        result = CliRunner().invoke(main, ["--config", str(config_file), *args])
        assert result.exit_code == 0, result.output
        assert SECRET not in result.output and "**********" in result.output


def test_a_secret_is_given_once_and_its_file_must_be_readable(tmp_path: Path):
    with pytest.raises(ValueError, match="not both"):
        load_config(_write(tmp_path, '[cassandra]\nusername = "u"\npassword = "p"\npassword_file = "f"\n'))
    with pytest.raises(ValueError, match="needs sasl_mechanism"):
        load_config(_write(tmp_path, '[kafka]\nsecurity_protocol = "SASL_SSL"\n'))
    with pytest.raises(ValueError, match="peer_token is gone"):
        load_config(_write(tmp_path, '[security]\npeer_token = "dicomgrid-dev-peer-token"\n'))
    config = load_config(_write(tmp_path, '[cassandra]\nusername = "u"\npassword_file = "missing"\n'))
    with pytest.raises(RuntimeError, match="cannot read"):
        config.cassandra.secret_password()


# -- what the clients are given ------------------------------------------------------------------------


def test_kafka_sasl_ssl_settings_reach_librdkafka_and_faust(tmp_path: Path, grid):
    (tmp_path / "kafka-password").write_text(SECRET)
    config = load_config(_write(tmp_path, (
        '[kafka]\nbootstrap_servers = "k1:9093,k2:9093"\nsecurity_protocol = "SASL_SSL"\n'
        'sasl_mechanism = "SCRAM-SHA-256"\nsasl_username = "grid"\nsasl_password_file = "kafka-password"\n'
        f'ssl_ca_location = "{grid.tls_ca_file}"\n')))
    assert config.kafka.client_config() == {
        "bootstrap.servers": "k1:9093,k2:9093", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "grid", "sasl.password": SECRET, "ssl.ca.location": str(grid.tls_ca_file),
        "ssl.endpoint.identification.algorithm": "https",
    }
    credentials = _credentials(config)
    assert (credentials.username, credentials.password, credentials.mechanism.value) == ("grid", SECRET, "SCRAM-SHA-256")
    assert isinstance(credentials.ssl_context, ssl.SSLContext)
    assert credentials.ssl_context.verify_mode == ssl.CERT_REQUIRED and credentials.ssl_context.check_hostname
    # PLAINTEXT (the local cluster) gets nothing of it.
    plain = load_config(_write(tmp_path, ""))
    assert plain.kafka.client_config() == {"bootstrap.servers": "127.0.0.1:9092", "security.protocol": "PLAINTEXT"}
    assert _credentials(plain) is None


def test_cassandra_auth_and_tls_reach_the_driver(tmp_path: Path, grid):
    cert, key = grid.site_tls_files("A")
    config = load_config(_write(tmp_path, (
        f'[cassandra]\nusername = "grid"\nssl = true\nssl_ca_file = "{grid.tls_ca_file}"\n'
        f'ssl_cert_file = "{cert}"\nssl_key_file = "{key}"\n')))
    options = security_options(config.cassandra.model_copy(update={"password": None, "password_file": None}))
    assert options["auth_provider"].username == "grid" and options["auth_provider"].password == ""
    with_password = load_config(_write(tmp_path, '[cassandra]\nusername = "grid"\npassword = "' + SECRET + '"\n'))
    options = security_options(with_password.cassandra)
    assert (options["auth_provider"].username, options["auth_provider"].password) == ("grid", SECRET)
    assert "ssl_context" not in options
    context = security_options(config.cassandra)["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert security_options(load_config(_write(tmp_path, "")).cassandra) == {}


# -- production ----------------------------------------------------------------------------------------


def test_production_refuses_development_material_with_one_clear_message(grid, tmp_path: Path):
    assert refusal(grid) is None  # development: anything goes
    production = grid.model_copy(update={"environment": "production"})
    message = refusal(production)
    assert message is not None and message.startswith("refusing to start in production: ")
    assert "development certificate" in message and "more)" in message
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "grid.toml"), "up"],
                                env={"DICOMGRID_ENVIRONMENT": "production"})
    assert result.exit_code != 0 and "refusing to start in production" in result.output
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "grid.toml"), "serve", "http", "--site", "A"],
                                env={"DICOMGRID_ENVIRONMENT": "production"})
    assert result.exit_code != 0 and "refusing to start in production" in result.output


def test_production_with_its_own_material_starts(grid, tmp_path: Path):
    (tmp_path / "trial").write_text("a-real-trial-secret-0123456789")
    secrets = grid.security.model_copy(update={"trial_key_secret": None, "trial_key_secret_file": tmp_path / "trial"})
    # No development certificate in use (this one has no TLS; with TLS, the hospital's own certificates).
    production = grid.model_copy(update={"environment": "production", "security": secrets,
                                         "tls": grid.tls.model_copy(update={"http": False, "dicom": False})})
    assert refusal(production) is None
    weak = production.model_copy(update={"security": secrets.model_copy(update={"require_tokens": False})})
    assert "require_tokens is false" in (refusal(weak) or "")
    shipped = production.model_copy(update={"security": grid.security})
    assert "trial_key_secret is the shipped development secret" in (refusal(shipped) or "")
