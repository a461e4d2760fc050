"""The grid's stream-processing app (faust-streaming): one worker per site, one consumer group.

Workers of every site share the partitions of ``dicom.instance.stored`` (under the grid's
``kafka.topic_prefix``); when a site goes down its partitions move to the others. Blocking Cassandra
work runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust

from dicomgrid import schemas
from dicomgrid.core.config import GridConfig
from dicomgrid.core.logging import get_logger
from dicomgrid.core.cassandra import Cassandra
from dicomgrid.core.index_writer import IndexWriter
from dicomgrid.processors.indexer import Indexer, decode_events

log = get_logger(__name__)

BATCH_SIZE = 500
BATCH_WITHIN_S = 0.2


def faust_broker(config: GridConfig) -> list[str]:
    return [f"kafka://{server.strip()}" for server in config.kafka.bootstrap_servers.split(",")]


def _credentials(config: GridConfig) -> Any:
    k = config.kafka
    if k.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=k.sasl_username, password=k.sasl_password, mechanism=k.sasl_mechanism or "PLAIN"
        )
    return None


def consumer_group(config: GridConfig) -> str:
    """The consumer group of a grid's processors: one per grid, shared by the workers of all its sites."""
    return f"{config.name}-processors"


async def _connect(config: GridConfig, local_dc: str) -> Cassandra:
    """Connect to Cassandra, waiting for it rather than failing the worker."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            db = Cassandra(config, local_dc=local_dc)
            await loop.run_in_executor(None, lambda: db.session)
            return db
        except Exception as exc:
            log.warning("cassandra unreachable; retrying", error=str(exc))
            await asyncio.sleep(3.0)


def create_app(config: GridConfig, site: str) -> faust.App:
    site_config = config.site(site)
    datadir = config.root / "processors" / config.name / site_config.name
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        consumer_group(config),
        broker=faust_broker(config),
        broker_credentials=_credentials(config),
        id_format="{id}",
        store="memory://",
        web_enabled=False,
        # No leader topic: the broker does not auto-create topics, and nothing here needs a leader.
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        datadir=str(datadir),
        broker_commit_every=200,
        broker_commit_interval=1.0,
    )
    instance_stored = app.topic(
        config.kafka.topic(schemas.TOPIC_INSTANCE_STORED), key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw"
    )

    @app.agent(instance_stored, name="indexer")
    async def index(stream: faust.Stream) -> None:
        loop = asyncio.get_running_loop()
        indexer = Indexer(IndexWriter(await _connect(config, site_config.cassandra_dc)))
        async for values in stream.take(BATCH_SIZE, within=BATCH_WITHIN_S):
            events = decode_events(values)
            while True:
                try:
                    await loop.run_in_executor(None, indexer.apply, events)
                    break
                except Exception as exc:  # Cassandra down: hold the offsets and retry, never skip
                    log.warning("indexing failed; retrying", error=str(exc), instances=len(events))
                    await asyncio.sleep(2.0)

    return app
