"""The processors' consumers fetch in batches: the settings reach the aiokafka consumer that faust's
worker thread builds (faust exposes neither, so a faust upgrade that changed how it builds its
consumer would silently undo them)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from dicomgrid.processors import fetching
from dicomgrid.processors.app import faust_app
from tests.unit.test_dicom_tls import _config


def test_the_worker_consumer_waits_for_a_batch(tmp_path: Path):
    async def build():
        app = faust_app(_config(tmp_path), "unit-fetching", tmp_path / "faust")
        consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
        try:
            return consumer._fetch_min_bytes, consumer._fetch_max_wait_ms
        finally:
            await consumer._client.close()

    assert asyncio.run(build()) == (fetching.FETCH_MIN_BYTES, fetching.FETCH_MAX_WAIT_MS)
    assert fetching.FETCH_MIN_BYTES > 1 and fetching.FETCH_MAX_WAIT_MS <= 200  # batches, lag bounded
