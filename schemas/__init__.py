"""The grid's public contract: CQL tables, Kafka topics and the JSON Schema of every event.

The files beside this module are the source of truth; this module only reads them.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import jsonschema_rs

TOPIC_INSTANCE_STORED = "dicom.instance.stored"
TOPIC_REPLICATION_REQUESTED = "dicom.replication.requested"
TOPIC_REPLICA_STORED = "dicom.replica.stored"
TOPIC_REPLICATION_FAILED = "dicom.replication.failed"
TOPIC_SCRUB_FINDING = "dicom.scrub.finding"
TOPIC_AUDIT = "dicom.audit"
TOPIC_DEADLETTER = "dicom.deadletter"

_HERE = resources.files(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    schema: str
    key: str
    config: dict[str, str] = field(default_factory=dict)
    partitions: int | None = None
    replication_factor: int | None = None


@cache
def topics() -> dict[str, TopicSpec]:
    """Topic definitions from topics.toml, by name."""
    data = tomllib.loads(_HERE.joinpath("topics.toml").read_text())
    return {name: TopicSpec(name=name, **spec) for name, spec in data["topics"].items()}


def cql_statements(keyspace: str, replication: dict[str, int]) -> list[str]:
    """Every CQL statement of the schema, in order, for this keyspace and per-DC replication."""
    strategy = {"class": "NetworkTopologyStrategy", **{dc: rf for dc, rf in replication.items()}}
    replication_cql = "{" + ", ".join(f"'{k}': '{v}'" for k, v in strategy.items()) + "}"
    statements: list[str] = []
    files = sorted((f for f in _HERE.joinpath("cql").iterdir() if f.name.endswith(".cql")), key=lambda f: f.name)
    for file in files:
        text = file.read_text()
        text = re.sub(r"--[^\n]*", "", text)
        text = text.replace("{keyspace}", keyspace).replace("{replication}", replication_cql)
        statements.extend(s.strip() for s in text.split(";") if s.strip())
    return statements


class InvalidEvent(ValueError):
    """An event breaks the JSON Schema of its topic."""


@cache
def _registry() -> jsonschema_rs.Registry:
    resources_ = []
    for file in _HERE.joinpath("events").iterdir():
        if file.name.endswith(".schema.json"):
            schema = json.loads(file.read_text())
            resources_.append((schema["$id"], schema))
    return jsonschema_rs.Registry(resources_)


@cache
def event_validator(topic: str) -> jsonschema_rs.Draft202012Validator:
    """A validator for the events of ``topic`` (formats such as uuid and date-time are checked).

    jsonschema-rs: events are validated on every publish and every consume, ingest's hot path included,
    where a pure-Python validator cost ~0.6 ms per instance event (this one: a few microseconds).
    """
    schema = json.loads(_HERE.joinpath("events", topics()[topic].schema).read_text())
    return jsonschema_rs.Draft202012Validator(schema, registry=_registry(), validate_formats=True)


def validate_event(topic: str, event: Any) -> None:
    """Raise :class:`InvalidEvent` if ``event`` breaks the contract of ``topic`` (a logical topic name)."""
    validator = event_validator(topic)
    try:
        try:
            validator.validate(event)
        except ValueError as exc:
            if isinstance(exc, jsonschema_rs.ValidationError):
                raise
            # jsonschema-rs takes exact JSON types only; subclasses (pydicom's UID is a str) are
            # validated as they will be serialized.
            validator.validate(json.loads(json.dumps(event)))
    except jsonschema_rs.ValidationError as exc:
        where = "/".join(str(p) for p in exc.instance_path) or "(root)"
        keyword = str(exc.schema_path[-1]) if exc.schema_path else "schema"
        # The validator's message quotes the offending value, which may be patient data: only messages
        # about the event's own structure are kept.
        detail = exc.message if keyword in _STRUCTURAL else f"fails {keyword!r}"
        raise InvalidEvent(f"{topics()[topic].name} event invalid at {where}: {detail}") from None


_STRUCTURAL = {"required", "additionalProperties", "unevaluatedProperties"}


def audit_rng_from_rnc(rnc: str) -> str:
    """The RELAX NG (XML) form of the standard's audit message schema (compact form).

    The standard's text places ``##`` documentation comments after the values they describe, which the
    compact grammar (and rnc2rng) only allows before an annotated pattern; as plain comments they are
    what the standard means (they carry no constraint).
    """
    import rnc2rng

    return rnc2rng.dumps(rnc2rng.loads(re.sub(r"##", "#", rnc)))


@cache
def audit_message_schema() -> Any:
    """lxml's RELAX NG validator for DICOM audit messages (schemas/audit/audit-message.rng)."""
    from lxml import etree

    return etree.RelaxNG(etree.fromstring(_HERE.joinpath("audit", "audit-message.rng").read_bytes()))
