"""The grid's configuration: one typed object, loaded from a TOML file plus environment overrides.

Resolution order (later wins):

1. the shipped defaults (``defaults.toml`` beside this module: a two-site grid on localhost);
2. the TOML file named by ``--config`` or ``DICOMGRID_CONFIG``, if any;
3. environment variables ``DICOMGRID_<SECTION>__<FIELD>``, e.g.
   ``DICOMGRID_KAFKA__BOOTSTRAP_SERVERS=10.0.0.5:9092`` or ``DICOMGRID_DATA_DIR=/srv/dicomgrid``.

Relative paths in the config are resolved against ``data_dir``; a relative ``data_dir`` is resolved
against the current working directory at load time, so every process of one grid agrees on it.
"""

from __future__ import annotations

import os
import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULTS_FILE = Path(__file__).with_name("defaults.toml")
CONFIG_ENV = "DICOMGRID_CONFIG"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


# Shipped for local development only; a production config that still has it refuses to start.
DEV_TRIAL_KEY_SECRET = "dicomgrid-dev-trial-key-secret"


class SecretUnavailable(RuntimeError):
    """A secret the config names (by value or by file) cannot be read."""


def read_secret(name: str, value: SecretStr | None, file: Path | None) -> str | None:
    """A secret given inline (``value``) or in a file (``file``; one line, trailing newline dropped).

    Secrets are kept as :class:`~pydantic.SecretStr` in the config, so its dumps, reprs and logs show
    ``**********``; only the code that hands one to a client library reads it, through here.
    """
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise SecretUnavailable(f"{name}: cannot read {file}: {exc.strerror}") from exc
    return value.get_secret_value() if value is not None else None


def _one_of(name: str, value: object, file: object) -> None:
    if value is not None and file is not None:
        raise ValueError(f"give {name} or {name}_file, not both")


def _check_ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_TITLE.match(value):
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable characters, no backslash")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(_Section):
    """How every process reaches the brokers."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    # The password inline (better from the environment: DICOMGRID_KAFKA__SASL_PASSWORD) or in a file.
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    # TLS to the brokers (SSL, SASL_SSL): the CA that signed their certificates and, for brokers that
    # want client certificates, this grid's certificate and key (PEM). Paths relative to data_dir.
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None
    ssl_key_password_file: Path | None = None
    # Check that a broker's certificate names the host connected to.
    ssl_check_hostname: bool = True
    # Prepended to every topic name of the contract (schemas/topics.toml), so several grids can share one
    # Kafka cluster without seeing each other's events: "" -> "dicom.audit", "lab." -> "lab.dicom.audit".
    topic_prefix: str = Field(default="", max_length=200, pattern=r"^[A-Za-z0-9._-]*$")
    # Topic layout used by `dicomgrid schema apply`.
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    min_insync_replicas: int = Field(default=1, ge=1)
    # How long ingest waits for a delivery report before answering the PACS with a failure.
    delivery_timeout_s: float = Field(default=15.0, gt=0)

    def topic(self, logical: str) -> str:
        """The physical Kafka topic of a logical topic name of the contract (e.g. ``dicom.instance.stored``)."""
        return self.topic_prefix + logical

    @model_validator(mode="after")
    def _secrets_given_once(self) -> "KafkaConfig":
        _one_of("kafka.sasl_password", self.sasl_password, self.sasl_password_file)
        _one_of("kafka.ssl_key_password", self.ssl_key_password, self.ssl_key_password_file)
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_mechanism):
            raise ValueError(f"kafka.security_protocol {self.security_protocol} needs sasl_mechanism and sasl_username")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def password(self) -> str | None:
        return read_secret("kafka.sasl_password", self.sasl_password, self.sasl_password_file)

    def key_password(self) -> str | None:
        return read_secret("kafka.ssl_key_password", self.ssl_key_password, self.ssl_key_password_file)

    def resolved(self, root: Path) -> "KafkaConfig":
        """This section with its relative file paths resolved against ``root`` (the data directory)."""
        return self.model_copy(update=_resolved_paths(self, root, (
            "sasl_password_file", "ssl_ca_location", "ssl_certificate_location", "ssl_key_location",
            "ssl_key_password_file")))

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by producers, consumers and the admin client (secrets included:
        never log the result)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL"):
            conf.update({"sasl.mechanism": self.sasl_mechanism, "sasl.username": self.sasl_username,
                         "sasl.password": self.password() or ""})
        if self.uses_tls:
            optional = {
                "ssl.ca.location": self.ssl_ca_location,
                "ssl.certificate.location": self.ssl_certificate_location,
                "ssl.key.location": self.ssl_key_location,
                "ssl.key.password": self.key_password(),
            }
            conf.update({k: str(v) for k, v in optional.items() if v is not None})
            conf["ssl.endpoint.identification.algorithm"] = "https" if self.ssl_check_hostname else "none"
        return conf


class CassandraConfig(_Section):
    """How every process reaches the metadata store."""

    contact_points: list[str] = ["127.0.0.1", "127.0.0.2"]
    port: int = 9042
    keyspace: str = "dicomgrid"
    # Authentication (PasswordAuthenticator): the password inline (better from the environment:
    # DICOMGRID_CASSANDRA__PASSWORD) or in a file.
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    # TLS to the nodes (client_encryption_options): the CA of their certificates and, for nodes that
    # require client certificates, this grid's certificate and key (PEM). Paths relative to data_dir.
    ssl: bool = False
    ssl_ca_file: Path | None = None
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None
    # Check that a node's certificate names the address connected to.
    ssl_check_hostname: bool = True
    # NetworkTopologyStrategy replication factor per datacenter.
    replication: dict[str, int] = {"dc1": 1, "dc2": 1}
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 10.0
    # Nodes of each other datacenter a process falls back to when every node of its own is down: the
    # site then keeps indexing and answering through another datacenter (LOCAL_QUORUM there), and its
    # own datacenter gets the writes by hinted handoff when it is back. 0: stay in the local DC.
    remote_dc_failover_hosts: int = Field(default=1, ge=0)

    @field_validator("keyspace")
    @classmethod
    def _keyspace_is_identifier(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,47}", value):
            raise ValueError(f"invalid keyspace name {value!r}")
        return value

    @model_validator(mode="after")
    def _secrets_given_once(self) -> "CassandraConfig":
        _one_of("cassandra.password", self.password, self.password_file)
        if (self.password is not None or self.password_file is not None) and not self.username:
            raise ValueError("cassandra.password needs cassandra.username")
        return self

    def secret_password(self) -> str | None:
        return read_secret("cassandra.password", self.password, self.password_file)

    def resolved(self, root: Path) -> "CassandraConfig":
        return self.model_copy(update=_resolved_paths(self, root, (
            "password_file", "ssl_ca_file", "ssl_cert_file", "ssl_key_file")))


def _resolved_paths(section: BaseModel, root: Path, fields: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for name in fields:
        value = getattr(section, name)
        if value is not None and not Path(value).expanduser().is_absolute():
            out[name] = root / Path(value).expanduser()
    return out


class SiteConfig(_Section):
    """One hospital site: its DICOM and HTTP endpoints, its blob store and its Cassandra datacenter."""

    name: str
    ae_title: str
    dicom_host: str = "127.0.0.1"
    dicom_port: int
    # The site AE's DICOM TLS port (PS3.15 B.1), beside the plain one (tls.plain_dicom); with tls.dicom
    # on, the site listens with TLS here.
    dicom_tls_port: int | None = Field(default=None, ge=1, le=65535)
    http_host: str = "127.0.0.1"
    http_port: int
    storage_root: Path
    cassandra_dc: str
    replicate_to: list[str] = []
    # Receiver processes sharing the site's DICOM port (SO_REUSEPORT).
    receiver_processes: int = Field(default=1, ge=1, le=64)
    # C-STORE payloads above this size are refused with 0xA700 (out of resources).
    max_instance_bytes: int = Field(default=4 * 1024**3, gt=0)
    # The site's own Kafka cluster (bootstrap servers). Unset: the grid's shared cluster
    # (``kafka.bootstrap_servers``). When every site names a cluster of its own, events cross between
    # sites by MirrorMaker 2 and each site consumes its own topics plus the others' mirrored ones
    # (docs/events.md, docs/deploy.md). Every other ``[kafka]`` setting is the grid's.
    kafka_bootstrap_servers: str | None = None
    # The site's TLS certificate (its DICOM TLS port and HTTPS; also presented when it calls out) and
    # its key, PEM. Unset: secrets/tls/<grid>-site-<name>.pem and -key.pem (made by `secrets init`).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # The Ed25519 key the site signs its requests to other sites' payload endpoints with (its own
    # credential: a site's key cannot speak for another site), and its public half, which every other
    # site verifies them with. Unset: secrets/<grid>-site-<name>-token.pem and .pub.pem.
    token_key_file: Path | None = None
    token_public_key_file: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}", value):
            raise ValueError(f"invalid site name {value!r}: letters, digits, '-' and '_' only")
        return value


class DicomPeer(_Section):
    """A remote DICOM application entity the grid connects to (C-MOVE destination, Storage Commitment
    requestor receiving its N-EVENT-REPORT)."""

    host: str
    port: int = Field(ge=1, le=65535)
    # Associations to this AE use TLS, verifying its certificate against ca_file (default: tls.ca_file)
    # and, with verify_hostname, that it names `host`; the site presents its own certificate.
    tls: bool = False
    ca_file: Path | None = None
    verify_hostname: bool = True
    # Calling AE titles that may C-MOVE instances to this AE (unset: every AE allowed to retrieve).
    move_requestors: list[str] | None = None
    # Whether this AE may request Storage Commitment (its reports are sent to the address above).
    commitment: bool = True

    @field_validator("move_requestors")
    @classmethod
    def _valid_requestors(cls, values: list[str] | None) -> list[str] | None:
        return None if values is None else [_check_ae_title(v) for v in values]


# The services of a site AE, for per-service allow-lists ([security.service_aes]).
DimseServiceName = Literal["storage", "query", "retrieve", "commitment"]
ClientCertificates = Literal["none", "optional", "required"]


class TlsConfig(_Section):
    """TLS on the sites' DICOM and HTTP ports, and on the associations and requests they make.

    Certificates are PEM files. Unset paths are the files ``dicomgrid secrets init`` makes (and ``make
    run`` and, in development, ``dicomgrid up``): a development CA under secrets/tls/ and a certificate
    per site issued by it. Production brings its own (the development CA's key lives beside the grid,
    so a production config that still uses a certificate it issued refuses to start).
    """

    # The CA (one or more PEM certificates) that certificates of the grid's sites and of TLS peers
    # chain to. Default: secrets/tls/<grid>-ca.pem.
    ca_file: Path | None = None
    # Each site AE that has a dicom_tls_port listens with TLS there ...
    dicom: bool = True
    # ... and plainly on its dicom_port (DCMTK's storescu without --tls; turn off in production).
    plain_dicom: bool = True
    # Each site's HTTP service (DICOMweb, payload transfer, /health) speaks HTTPS on its http_port
    # (the shipped defaults turn it on; off here so a config built in code asks for it explicitly).
    http: bool = False
    # Client certificates on the DICOM TLS port: "none" (not asked for), "optional" (a client may
    # present one; it must then chain to ca_file and speak for the calling AE title), "required".
    client_certificates: ClientCertificates = "optional"
    # Which calling AE titles a client certificate speaks for, by the certificate's identity (its
    # subject CN or a DNS name of its subjectAltName): identity -> AE titles. A certificate whose
    # identity is not listed speaks for the AE title equal to that identity only.
    ae_identities: dict[str, list[str]] = {}
    minimum_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @field_validator("ae_identities")
    @classmethod
    def _valid_identities(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: [_check_ae_title(t) for t in v] for k, v in value.items()}


class SecurityConfig(_Section):
    # Calling AE titles allowed to associate with any site. DCMTK's defaults are in the shipped config so
    # that a first `storescu` works; production configs replace the list.
    allowed_calling_aes: list[str] = []
    # When true, an empty allow-list admits everyone (development only).
    allow_any_calling_ae: bool = False
    # Per service of the site AE, the calling AE titles that may use it (a subset of the above);
    # a service not listed is open to every allowed calling AE. The presentation contexts of a service
    # a caller may not use are rejected, and requests for it refused (0x0124), both audited.
    service_aes: dict[DimseServiceName, list[str]] = {}
    # Bearer tokens (JWT, EdDSA) on DICOMweb, the payload endpoint and the audit endpoint; false lets
    # anyone in (development only: a production config refuses to start with it).
    require_tokens: bool = True
    # The grid's token signing key (Ed25519, PEM), which `dicomgrid token issue` signs with, and its
    # public half, which every site verifies tokens with. Default: secrets/<grid>-token-signing.pem and
    # .pub.pem. Only the public half needs to be on the sites' hosts.
    token_signing_key_file: Path | None = None
    token_public_key_file: Path | None = None
    # Lifetime of the tokens a site signs for its requests to another site's payload endpoint.
    peer_token_ttl_s: float = Field(default=300.0, ge=10)
    # Longest lifetime `dicomgrid token issue` grants.
    max_token_ttl_s: float = Field(default=366 * 86400.0, gt=0)
    # Where `dicomgrid secrets init` keeps what it makes (relative to data_dir).
    secrets_dir: Path = Path("secrets")
    # The Ed25519 key that signs the audit chain's checkpoints (PEM, PKCS8); created if it does not
    # exist. Relative to data_dir. Default: secrets/<grid name>-audit-signing.pem.
    audit_signing_key_file: Path | None = None
    # Trial pseudonym keys are stored in Cassandra wrapped under a key derived from this secret, so the
    # keyspace alone does not reveal them. Every process of the grid needs the same value. The default is
    # for local development only.
    trial_key_secret: SecretStr | None = SecretStr(DEV_TRIAL_KEY_SECRET)
    trial_key_secret_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_shared_peer_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and "peer_token" in data:
            raise ValueError("security.peer_token is gone: each site signs its requests to other sites with its "
                             "own key (sites[].token_key_file); remove peer_token")
        return data

    @model_validator(mode="after")
    def _trial_secret(self) -> "SecurityConfig":
        if self.trial_key_secret_file is None and self.trial_key_secret is not None and len(self.trial_key_secret.get_secret_value()) < 16:
            raise ValueError("security.trial_key_secret must be at least 16 characters")
        return self

    def trial_key(self) -> str:
        """The trial key secret (from the config, the environment or trial_key_secret_file)."""
        value = read_secret("security.trial_key_secret", self.trial_key_secret, self.trial_key_secret_file)
        if value is None or len(value) < 16:
            raise SecretUnavailable("security.trial_key_secret must be at least 16 characters")
        return value

    @field_validator("allowed_calling_aes")
    @classmethod
    def _valid_titles(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]

    @field_validator("service_aes")
    @classmethod
    def _valid_service_titles(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: [_check_ae_title(t) for t in v] for k, v in value.items()}


class ReplicationConfig(_Section):
    """How payloads reach other sites (``dicom.replication.requested`` -> each target site's worker)."""

    # Sites that must hold a verified copy before an instance counts as safe (Storage Commitment
    # success, replication status). Unset: two sites, or one in a one-site grid.
    min_copies: int | None = Field(default=None, ge=1)
    # Transfers a site's replication worker runs at once, and their combined bandwidth (unset: no cap).
    concurrency: int = Field(default=4, ge=1, le=64)
    bandwidth_mb_s: float | None = Field(default=None, gt=0)
    # Attempts per request, with capped exponential backoff and jitter between them; then the request
    # goes to dicom.replication.failed for the repair path.
    max_attempts: int = Field(default=5, ge=1)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=3.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)


class HealingConfig(_Section):
    """Each site's background healing, run by its replication worker (and on demand by the CLI)."""

    # Scrub: every local copy re-hashed at this rate, a full pass at most once per period; missing or
    # corrupt copies are repaired from other sites.
    scrub_rate_mb_s: float = Field(default=50.0, gt=0)
    scrub_period_h: float = Field(default=168.0, gt=0)
    # Anti-entropy: the ledger compared with the policy this often; every copy a site lacks is requested.
    sweep_period_min: float = Field(default=60.0, gt=0)
    # Crash leftovers in a blob store's tmp/ are removed once nobody wrote to them for this long.
    tmp_idle_s: float = Field(default=600.0, gt=0)


class AnalyticsConfig(_Section):
    """The Parquet sink: the grid's events as hive-partitioned datasets (consumers/parquet_sink.py)."""

    # Sites whose services include a sink (one consumer group: they share the partitions). Unset: every
    # site. The directory must then be storage they share (an object-store mount); or name one site.
    sites: list[str] | None = None
    # Where the datasets are; relative to data_dir. Unset: analytics/<grid name>.
    directory: Path | None = None
    # A Kafka partition's buffered rows are written out at this many rows or this age.
    flush_rows: int = Field(default=5000, ge=1)
    flush_s: float = Field(default=30.0, gt=0)


class StorageCommitmentConfig(_Section):
    """Storage Commitment Push Model SCP (1.2.840.10008.1.20.1) on every site AE."""

    # How long a request waits for its instances to reach min_copies before they are reported failed.
    timeout_s: float = Field(default=60.0, gt=0)
    # An instance the index does not know yet is looked for this long before it is reported as
    # "no such object instance": its location row is written just after the C-STORE response, and
    # reaches another site's datacenter a moment later.
    unknown_grace_s: float = Field(default=5.0, ge=0)
    # How often the ledger is read for the instances of open transactions.
    poll_interval_s: float = Field(default=0.5, gt=0)
    # Attempts to deliver an N-EVENT-REPORT to a requestor that does not answer, with capped
    # exponential backoff and jitter between them; each attempt's association times out after
    # report_timeout_s.
    report_attempts: int = Field(default=5, ge=1)
    report_backoff_initial_s: float = Field(default=1.0, gt=0)
    report_backoff_max_s: float = Field(default=30.0, gt=0)
    report_timeout_s: float = Field(default=10.0, gt=0)
    # A receiver process owns the transactions it works on for lease_s, renewing as it goes; one that
    # dies leaves them to another receiver of the site (or its own restart) once the lease has run
    # out. Open transactions are looked for every scan_interval_s. Keep the lease well above the
    # clock skew between a site's receiver hosts.
    lease_s: float = Field(default=30.0, gt=0)
    scan_interval_s: float = Field(default=5.0, gt=0)
    # Referenced instances one request may name (a larger one is refused with 0x0213).
    max_instances: int = Field(default=10_000, ge=1)
class ConnectionLimits(_Section):
    """What a site's DICOM and HTTP ports grant connections that have not asked for anything yet.

    A connection is *pending* from TCP accept until its DICOM association is negotiated (the
    A-ASSOCIATE-RQ has arrived and been answered) or its HTTP request head has arrived; a kept-alive
    HTTP connection is pending again after each response. Pending connections hold a socket and, for
    DICOM, two threads each, so an attacker without an AE title could otherwise fill a site's port.
    """

    # Seconds a connection may stay pending, counted from accept (or from the last HTTP response): a
    # sender dribbling bytes cannot stretch it.
    request_timeout_s: float = Field(default=5.0, gt=0)
    # Pending connections from one IP address, per process. A new one closes that address's oldest
    # pending connection, so a real client behind the address of an attacker holding idle sockets
    # still gets in.
    max_pending_per_peer: int = Field(default=8, ge=1)
    # Pending connections from any address, per process; a new one closes the oldest.
    max_pending: int = Field(default=128, ge=1)
    # Negotiated DICOM associations per receiver process; pending connections do not count. Beyond it
    # an association is rejected (transient, local limit exceeded), so the PACS retries later.
    max_associations: int = Field(default=64, ge=1)


class LogConfig(_Section):
    """The grid's own service logs (``<data_dir>/logs/``): appended across restarts, rotated by size."""

    max_bytes: int = Field(default=20 * 1024**2, ge=64 * 1024)
    # Rotated files kept beside the current one (``.1`` newest ... ``.N`` oldest).
    backups: int = Field(default=5, ge=1)
    # Values of PHI-bearing keys (patient names and IDs, birth dates, accession numbers, query keys,
    # free text, paths that embed them) are replaced by "[redacted]" in every log record. The audit
    # trail is where identities are kept. Turn off only to debug, on a system without real patients.
    redact_phi: bool = True


class LimitsConfig(_Section):
    """What one request may ask of a site; beyond each limit it is refused cleanly (a DICOM status or an
    HTTP error, a log line, an audit record) and the service goes on serving everyone else."""

    # STOW-RS: a request body larger than this is refused with 413 (from Content-Length before a byte
    # is read, or as soon as a chunked body passes it); each part is also held to the site's
    # max_instance_bytes (failure 0xA702). Nothing of a refused request is stored.
    stow_max_request_bytes: int = Field(default=8 * 1024**3, gt=0)
    # STOW-RS parts (instances) per request; more: 413. Every part is spooled to a file of its own (an
    # open descriptor) until the whole body has arrived.
    stow_max_parts: int = Field(default=1000, ge=1)
    # QIDO-RS: results per response. A larger ``limit`` is clamped to this, with a Warning: 299 header
    # (PS3.18 8.3.4.4); more matches are paged with ``offset``.
    qido_max_results: int = Field(default=1000, ge=1)
    # QIDO-RS: largest ``offset``; beyond it: 400 (narrow the query instead of paging that deep).
    qido_max_offset: int = Field(default=100_000, ge=0)
    # C-FIND and QIDO-RS: index rows one query may read. A query that would read more (a wildcard over
    # the whole index, a very deep page) is refused: C-FIND 0xA700 (out of resources), QIDO-RS 413.
    query_scan_budget_rows: int = Field(default=100_000, ge=1)
    # Negotiated associations one calling AE title may hold at once, per receiver process (the site-wide
    # cap is connections.max_associations). Beyond it: A-ASSOCIATE-RJ, transient, local limit exceeded.
    max_associations_per_calling_ae: int = Field(default=16, ge=1)


class SchedulingConfig(_Section):
    """How a site's processes share CPUs with each other.

    Receivers and the event log are on the path a sender waits on; the stream processors (indexer,
    replication fan-out and worker, Parquet sink) work from Kafka and catch up. On a saturated machine
    the kernel gives the background processes only what the receive path leaves (their index lag is
    what the benchmark reports); on a machine with idle cores the setting changes nothing.
    """

    # Nice increment (0-19) the background services apply to themselves at start; 0 turns it off.
    background_nice: int = Field(default=5, ge=0, le=19)


class SupervisorConfig(_Section):
    """How ``dicomgrid up`` restarts a service whose process exited."""

    # Delay before the first restart; it doubles with every further exit, up to restart_delay_max_s.
    restart_delay_s: float = Field(default=0.5, gt=0)
    restart_delay_max_s: float = Field(default=30.0, gt=0)
    # A service that stayed up this long is healthy again: its next restart is quick once more.
    stable_after_s: float = Field(default=60.0, gt=0)


class InfraConfig(_Section):
    """The local development cluster (`dicomgrid infra ...`): versions and sizes."""

    kafka_version: str = "4.1.1"
    cassandra_version: str = "5.0.9"
    kafka_heap: str = "512m"
    cassandra_heap: str = "1G"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    cassandra_cluster_name: str = "dicomgrid"
    # Every node binds the same ports on its own loopback address. JMX listens on 127.0.0.1 only, so
    # node i takes cassandra_jmx_port + i - 1 (nodetool -p PORT).
    cassandra_storage_port: int = 7000
    cassandra_jmx_port: int = 7199
    # Node i (1-based) of Cassandra listens on 127.0.0.i and belongs to datacenter "dc<i>".
    cassandra_dcs: int = Field(default=2, ge=1, le=9)
    start_timeout_s: float = 240.0
    # With a Kafka cluster per site (sites[].kafka_bootstrap_servers on 127.0.0.1), `infra up` runs one
    # KRaft broker per site (client port from the site's bootstrap, controller port one above it) and
    # a dedicated MirrorMaker 2 process (its version is kafka_version) mirroring the grid's topics
    # between every pair of sites.
    kafka_site_heap: str = "256m"
    mirrormaker_heap: str = "256m"
    # Where those brokers and MirrorMaker keep data, pid files and logs; relative to data_dir. Unset:
    # data_dir. (Jars stay under data_dir/lib either way.)
    local_dir: Path | None = None


class GridConfig(BaseSettings):
    """Everything one grid needs to know about itself."""

    model_config = SettingsConfigDict(
        env_prefix="DICOMGRID_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    name: str = "dicomgrid"
    # "production" refuses to start with development material (see dicomgrid.core.production).
    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path(".dicomgrid")
    log_level: str = "INFO"
    kafka: KafkaConfig = KafkaConfig()
    cassandra: CassandraConfig = CassandraConfig()
    sites: list[SiteConfig] = []
    security: SecurityConfig = SecurityConfig()
    tls: TlsConfig = TlsConfig()
    # Remote AEs the grid connects to, by AE title: C-MOVE destinations and Storage Commitment
    # requestors (their N-EVENT-REPORT goes to the address listed here).
    remote_aes: dict[str, DicomPeer] = {}
    replication: ReplicationConfig = ReplicationConfig()
    healing: HealingConfig = HealingConfig()
    analytics: AnalyticsConfig = AnalyticsConfig()
    storage_commitment: StorageCommitmentConfig = StorageCommitmentConfig()
    connections: ConnectionLimits = ConnectionLimits()
    limits: LimitsConfig = LimitsConfig()
    logs: LogConfig = LogConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    infra: InfraConfig = InfraConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file contents passed in as init kwargs.
        return (env_settings, init_settings)

    @field_validator("remote_aes")
    @classmethod
    def _valid_destination_titles(cls, value: dict[str, DicomPeer]) -> dict[str, DicomPeer]:
        return {_check_ae_title(k): v for k, v in value.items()}

    @model_validator(mode="after")
    def _consistent(self) -> "GridConfig":
        if self.kafka.min_insync_replicas > self.kafka.replication_factor:
            raise ValueError(
                f"kafka.min_insync_replicas = {self.kafka.min_insync_replicas} is more than kafka.replication_factor "
                f"= {self.kafka.replication_factor}: every acks=all publish (every C-STORE) would be refused"
            )
        if any(rf < 1 for dc, rf in self.cassandra.replication.items() if dc in {s.cassandra_dc for s in self.sites}):
            raise ValueError("every site's Cassandra datacenter needs a replication factor of at least 1 "
                             "(its LOCAL_QUORUM reads and writes would have no replica)")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("site names must be unique")
        titles = [s.ae_title for s in self.sites]
        if len(set(titles)) != len(titles):
            raise ValueError("site AE titles must be unique")
        own = [s.name for s in self.sites if s.kafka_bootstrap_servers]
        if own and len(own) != len(self.sites):
            raise ValueError(
                f"sites {own} name a Kafka cluster of their own and {sorted(set(names) - set(own))} do not: "
                f"either every site has its own cluster (sites[].kafka_bootstrap_servers) or none"
            )
        clusters = [self.site_kafka(name).bootstrap_servers for name in own]
        if len(set(clusters)) != len(clusters):
            raise ValueError(f"sites with a Kafka cluster of their own need distinct clusters: {clusters}")
        for site in self.sites:
            unknown = set(site.replicate_to) - set(names)
            if unknown:
                raise ValueError(f"site {site.name} replicates to unknown sites {sorted(unknown)}")
            if 1 + len(set(site.replicate_to) - {site.name}) < self.min_copies:
                raise ValueError(
                    f"site {site.name} replicates to {sorted(site.replicate_to)}: with its own copy that is fewer "
                    f"than replication.min_copies = {self.min_copies}"
                )
            if site.cassandra_dc not in self.cassandra.replication:
                raise ValueError(
                    f"site {site.name} uses Cassandra DC {site.cassandra_dc!r}, "
                    f"which is not in cassandra.replication"
                )
            if not self.tls.plain_dicom and not (self.tls.dicom and site.dicom_tls_port):
                raise ValueError(f"site {site.name} would not listen for DICOM: tls.plain_dicom is off and "
                                 f"it has no dicom_tls_port (with tls.dicom on)")
            if site.dicom_tls_port is not None and site.dicom_tls_port in (site.dicom_port, site.http_port):
                raise ValueError(f"site {site.name}: dicom_tls_port must differ from its other ports")
        listed = {t for titles in self.security.service_aes.values() for t in titles}
        unknown = listed - set(self.security.allowed_calling_aes) if self.security.allowed_calling_aes else set()
        if unknown:
            raise ValueError(f"security.service_aes names AE titles not in allowed_calling_aes: {sorted(unknown)}")
        return self

    # -- derived values ---------------------------------------------------------------------------

    @property
    def min_copies(self) -> int:
        """Verified copies an instance needs to count as safe."""
        configured = self.replication.min_copies
        return configured if configured is not None else min(2, max(1, len(self.sites)))

    @property
    def kafka_per_site(self) -> bool:
        """Whether every site has a Kafka cluster of its own, mirrored to the others by MirrorMaker 2."""
        return bool(self.sites) and all(s.kafka_bootstrap_servers for s in self.sites)

    def site_kafka(self, name: str) -> KafkaConfig:
        """The Kafka settings of site ``name``'s services: its own cluster, or the grid's shared one."""
        own = self.site(name).kafka_bootstrap_servers
        return self.kafka.model_copy(update={"bootstrap_servers": own}) if own else self.kafka

    def for_site(self, name: str) -> "GridConfig":
        """This config as site ``name``'s services see it: ``kafka`` is the site's own cluster.

        Every producer and consumer a site's process creates takes ``config.kafka``, so a process of one
        site works from the config this returns. With one shared cluster it is the config itself.
        """
        kafka = self.site_kafka(name)
        return self if kafka is self.kafka else self.model_copy(update={"kafka": kafka})

    def mirror_alias(self, name: str) -> str:
        """The MirrorMaker 2 cluster alias of site ``name``'s Kafka cluster: the site's name."""
        return self.site(name).name

    def consumed_topics(self, site: str, logical: str) -> list[str]:
        """The physical topics site ``site``'s services read for ``logical``: the grid's topic, and with
        per-site clusters the other sites' topics as MirrorMaker 2 mirrors them into this site's cluster
        (DefaultReplicationPolicy: ``<source alias>.<topic>``)."""
        own = self.kafka.topic(logical)
        if not self.kafka_per_site:
            return [own]
        return [own, *(f"{self.mirror_alias(s.name)}.{own}" for s in self.sites if s.name != site)]

    @cached_property
    def root(self) -> Path:
        """The absolute data directory."""
        return self.data_dir.expanduser().resolve()

    def resolve(self, path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else self.root / path

    def site(self, name: str) -> SiteConfig:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(f"no site named {name!r}; configured: {[s.name for s in self.sites]}")

    @property
    def infra_dir(self) -> Path:
        """Where the local per-site Kafka brokers and MirrorMaker keep their files (``infra.local_dir``)."""
        return self.resolve(self.infra.local_dir) if self.infra.local_dir else self.root

    @property
    def secrets_dir(self) -> Path:
        return self.resolve(self.security.secrets_dir)

    @property
    def audit_signing_key_file(self) -> Path:
        configured = self.security.audit_signing_key_file
        return self.resolve(configured) if configured else self.secrets_dir / f"{self.name}-audit-signing.pem"

    # TLS material and token keys (defaults: what `dicomgrid secrets init` makes) ------------------

    @property
    def tls_ca_file(self) -> Path:
        configured = self.tls.ca_file
        return self.resolve(configured) if configured else self.secrets_dir / "tls" / f"{self.name}-ca.pem"

    def site_tls_files(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of a site's TLS identity."""
        site = self.site(name)
        base = self.secrets_dir / "tls" / f"{self.name}-site-{site.name}"
        cert = self.resolve(site.tls_cert_file) if site.tls_cert_file else base.with_name(base.name + ".pem")
        key = self.resolve(site.tls_key_file) if site.tls_key_file else base.with_name(base.name + "-key.pem")
        return cert, key

    def site_token_key_files(self, name: str) -> tuple[Path, Path]:
        """(private, public) key a site signs its requests to other sites with."""
        site = self.site(name)
        base = f"{self.name}-site-{site.name}-token"
        private = self.resolve(site.token_key_file) if site.token_key_file else self.secrets_dir / f"{base}.pem"
        public = (self.resolve(site.token_public_key_file) if site.token_public_key_file
                  else self.secrets_dir / f"{base}.pub.pem")
        return private, public

    @property
    def token_key_files(self) -> tuple[Path, Path]:
        """(private, public) key of the grid's token issuer."""
        sec = self.security
        private = (self.resolve(sec.token_signing_key_file) if sec.token_signing_key_file
                   else self.secrets_dir / f"{self.name}-token-signing.pem")
        public = (self.resolve(sec.token_public_key_file) if sec.token_public_key_file
                  else self.secrets_dir / f"{self.name}-token-signing.pub.pem")
        return private, public

    def dicom_tls_port(self, name: str) -> int | None:
        """The port a site AE listens on with TLS (None: none)."""
        return self.site(name).dicom_tls_port if self.tls.dicom else None

    def http_scheme(self) -> str:
        return "https" if self.tls.http else "http"

    def http_url(self, name: str) -> str:
        """The base URL of a site's HTTP service (no trailing slash)."""
        site = self.site(name)
        return f"{self.http_scheme()}://{site.http_host}:{site.http_port}"

    def ae_may_use(self, ae_title: str | None, service: str) -> bool:
        """Whether a calling AE title (already admitted by the allow-list) may use a service of the site AE."""
        allowed = self.security.service_aes.get(service)  # type: ignore[call-overload]
        return allowed is None or (ae_title or "").strip() in allowed

    def site_storage(self, name: str) -> Path:
        return self.resolve(self.site(name).storage_root)

    def is_calling_ae_allowed(self, ae_title: str) -> bool:
        if self.security.allow_any_calling_ae and not self.security.allowed_calling_aes:
            return True
        return ae_title.strip() in self.security.allowed_calling_aes


def _merge(model: type[BaseModel], base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: a section of the config (a model) is merged key by key, every other
    value, dict-valued settings included, is replaced whole.

    A production file that lists its ``[remote_aes]`` or its ``[cassandra] replication`` must not keep the
    shipped localhost destinations or datacenters beside its own.
    """
    merged = dict(base)
    for key, value in override.items():
        field = model.model_fields.get(key)
        section = field.annotation if field is not None else None
        if isinstance(section, type) and issubclass(section, BaseModel) and isinstance(value, dict) \
                and isinstance(merged.get(key), dict):
            merged[key] = _merge(section, merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike[str] | None = None) -> GridConfig:
    """Load the grid config: shipped defaults, then ``path`` (or ``$DICOMGRID_CONFIG``), then env."""
    with DEFAULTS_FILE.open("rb") as fh:
        data = tomllib.load(fh)
    path = path or os.environ.get(CONFIG_ENV)
    if path:
        with Path(path).open("rb") as fh:
            user = tomllib.load(fh)
        data = _merge(GridConfig, data, user)
    config = GridConfig(**data)
    # Pin the data directory now, so a later chdir cannot change where this grid keeps its files; the
    # file paths of the Kafka and Cassandra sections are resolved against it too.
    root = config.root
    security = config.security.model_copy(update=_resolved_paths(config.security, root, ("trial_key_secret_file",)))
    return config.model_copy(update={"data_dir": root, "kafka": config.kafka.resolved(root),
                                     "cassandra": config.cassandra.resolved(root), "security": security})
