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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULTS_FILE = Path(__file__).with_name("defaults.toml")
CONFIG_ENV = "DICOMGRID_CONFIG"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls


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
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_ca_location: str | None = None
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

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by producers, consumers and the admin client."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        return conf


class CassandraConfig(_Section):
    """How every process reaches the metadata store."""

    contact_points: list[str] = ["127.0.0.1", "127.0.0.2"]
    port: int = 9042
    keyspace: str = "dicomgrid"
    username: str | None = None
    password: str | None = None
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


class SiteConfig(_Section):
    """One hospital site: its DICOM and HTTP endpoints, its blob store and its Cassandra datacenter."""

    name: str
    ae_title: str
    dicom_host: str = "127.0.0.1"
    dicom_port: int
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


class SecurityConfig(_Section):
    # Calling AE titles allowed to associate with any site. DCMTK's defaults are in the shipped config so
    # that a first `storescu` works; production configs replace the list.
    allowed_calling_aes: list[str] = []
    # When true, an empty allow-list admits everyone (development only).
    allow_any_calling_ae: bool = False
    # Bearer token sites present to each other's payload endpoint (GET /internal/payloads/{sha256}).
    # The default is for local development only; production configs set their own secret.
    peer_token: str = Field(default="dicomgrid-dev-peer-token", min_length=16)
    # The Ed25519 key that signs the audit chain's checkpoints (PEM, PKCS8); created if it does not
    # exist. Relative to data_dir. Default: secrets/<grid name>-audit-signing.pem.
    audit_signing_key_file: Path | None = None
    # Trial pseudonym keys are stored in Cassandra wrapped under a key derived from this secret, so the
    # keyspace alone does not reveal them. Every process of the grid needs the same value. The default is
    # for local development only.
    trial_key_secret: str = Field(default="dicomgrid-dev-trial-key-secret", min_length=16)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _valid_titles(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]


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
    data_dir: Path = Path(".dicomgrid")
    log_level: str = "INFO"
    kafka: KafkaConfig = KafkaConfig()
    cassandra: CassandraConfig = CassandraConfig()
    sites: list[SiteConfig] = []
    security: SecurityConfig = SecurityConfig()
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
    def audit_signing_key_file(self) -> Path:
        configured = self.security.audit_signing_key_file
        return self.resolve(configured) if configured else self.root / "secrets" / f"{self.name}-audit-signing.pem"

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
    # Pin the data directory now, so a later chdir cannot change where this grid keeps its files.
    return config.model_copy(update={"data_dir": config.root})
