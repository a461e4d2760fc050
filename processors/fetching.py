"""How the processors' consumers fetch: in batches, not one message per request.

aiokafka (faust's client) asks with ``fetch.min.bytes = 1``, so the broker answers a consumer's fetch
as soon as one message arrives. Under ingest that is a fetch, a response and a wake-up of the worker
for nearly every instance, for each of the grid's consumers, on the same cores as the receive path,
whose ``acks=all`` round trip they stretch. Here the broker holds a fetch until
:data:`FETCH_MIN_BYTES` are there or :data:`FETCH_MAX_WAIT_MS` have passed, as a Kafka Streams
application tuned for throughput does: a bounded delay (the index lag grows by at most that wait)
for a fraction of the requests. faust exposes neither setting, so its consumer thread is given them
(the Parquet sink's librdkafka consumer takes the same two directly).
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as driver

from dicomgrid.core.kafka import FETCH_MAX_WAIT_MS, FETCH_MIN_BYTES


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by the consumer's fetcher when it starts, which is after this.
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(driver.Transport):
    Consumer = _Consumer


class App(faust.App):
    """A faust app whose worker consumers fetch in batches (see the module docstring)."""

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)
