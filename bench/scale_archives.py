"""The two archives holding a metadata-scale set (:mod:`bench.scale_set`), loaded once and kept.

* **grid**: one keyspace per set (``dicomgrid_scale_<tag>``), filled through the grid's own indexer (the
  upserts its stream processor makes for each ``dicom.instance.stored`` event), answered by a one-site
  grid running only its receiver (:func:`bench.grid.scale_layout`).
* **Orthanc**: Debian's Orthanc with its default SQLite index, in a directory of its own per set under
  ``bench/scale/``, filled by ``POST /instances`` of small Part 10 files from a few threads over
  kept-alive connections. Its storage is not fsynced (``SyncStorageArea: false``): the set is loaded, not
  ingested, and only queried afterwards.

Both are persistent: an archive that already holds the whole set is not loaded again (loading 100k
studies takes minutes); one holding part of it (an interrupted load) is topped up from where it
stopped. Every complete load is recorded, with its duration, in ``bench/scale/<tag>.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import httpx
from tqdm import tqdm

from bench.grid import BenchGrid, scale_layout
from bench.paths import BENCH_ROOT
from bench.scale_set import ScaleSet, ScaleStudy
from bench.targets import Orthanc
from dicomgrid.core.index_writer import IndexWriter
from dicomgrid.processors.indexer import Indexer

SCALE_ROOT = BENCH_ROOT / "scale"
INDEX_BATCH = 500  # events per indexer batch, as the stream processor takes them
POST_THREADS = 4
POST_WINDOW = 1000  # studies in flight at most: a resumed load goes back at most this far
COUNT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class LoadReport:
    archive: str
    studies: int  # studies the archive holds now
    loaded: int  # studies sent to it by this run (0: the cached set was complete)
    seconds: float  # this run's loading time
    last_complete_load: dict[str, Any] | None  # the last load that completed the set: studies, seconds, at

    @property
    def cached(self) -> bool:
        return self.loaded == 0


class _Manifest:
    """``bench/scale/<tag>.json``: per archive, the last load that completed the set."""

    def __init__(self, scale: ScaleSet) -> None:
        self.path = SCALE_ROOT / f"{scale.tag}.json"

    def read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def record(self, archive: str, studies: int, seconds: float) -> None:
        data = self.read()
        data[archive] = {"studies": studies, "seconds": round(seconds, 1),
                         "studies_per_s": round(studies / seconds, 1) if seconds else None,
                         "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=1) + "\n")


def _resume_point(held: int, total: int, window: int, archive: str) -> int:
    """Where an interrupted load restarts: at most ``window`` studies before what the archive holds."""
    if held > total:
        raise RuntimeError(f"{archive} holds {held} studies, more than the {total} of its scale set: it is not "
                           "this set; remove it and run again")
    return max(0, held - window)


def _load(archive: str, scale: ScaleSet, held: int, window: int, load_from: Callable[[int], int]) -> LoadReport:
    """Nothing if ``held`` is the whole set; else ``load_from(first study)``, which returns what is held then."""
    manifest = _Manifest(scale)
    if held == scale.studies:
        return LoadReport(archive, held, 0, 0.0, manifest.read().get(archive))
    start = _resume_point(held, scale.studies, window, archive)
    started = time.monotonic()
    held_now = load_from(start)
    seconds = time.monotonic() - started
    if held_now != scale.studies:
        raise RuntimeError(f"{archive} holds {held_now} studies after loading, not {scale.studies}")
    if start == 0:
        manifest.record(archive, scale.studies, seconds)
    return LoadReport(archive, held_now, scale.studies - start, round(seconds, 2), manifest.read().get(archive))


def _progress(archive: str, scale: ScaleSet, start: int) -> tqdm:
    return tqdm(total=scale.studies, initial=start, unit="study", desc=f"loading {archive} ({scale.studies} studies)")


class ScaleGrid:
    """The grid side of a scale set."""

    key, label = "grid", "dicomgrid"

    def __init__(self, scale: ScaleSet) -> None:
        self.scale = scale
        self.grid = BenchGrid(scale_layout(f"dicomgrid_scale_{scale.tag}", scale.tag.replace("_", "-")))
        self.ae_title = self.grid.site.ae_title
        self.port = self.grid.dicom_port

    def start(self) -> LoadReport:
        """Grid up (schema applied to the set's keyspace), then load whatever the keyspace lacks."""
        self.grid.start()
        return _load(self.label, self.scale, self._count(), INDEX_BATCH, self._index)

    def _count(self) -> int:
        assert self.grid.metadata is not None
        return self.grid.metadata.db.execute("SELECT count(*) FROM studies", timeout=COUNT_TIMEOUT_S).one()[0]

    def _index(self, start: int) -> int:
        assert self.grid.metadata is not None
        indexer = Indexer(IndexWriter(self.grid.metadata.db))
        studies = self.scale.items(start)
        with _progress(self.label, self.scale, start) as bar:
            while batch := list(islice(studies, INDEX_BATCH)):
                indexer.apply([study.event() for study in batch])
                bar.update(len(batch))
        return self._count()

    def stop(self) -> None:
        self.grid.stop()

    def describe(self) -> dict[str, object]:
        return {"keyspace": self.grid.layout.keyspace, "services": list(self.grid.layout.services)}


class ScaleOrthanc:
    """The Orthanc side of a scale set: a second Orthanc on ports of its own, kept between runs."""

    key, label = "orthanc", "Orthanc"

    def __init__(self, scale: ScaleSet) -> None:
        self.scale = scale
        self.orthanc = Orthanc(f"orthanc-scale-{scale.tag}", SCALE_ROOT / f"orthanc-{scale.tag}",
                               SyncStorageArea=False)
        self.ae_title = self.orthanc.ae_title
        self.port = self.orthanc.port

    def start(self) -> LoadReport:
        self.orthanc.start()
        return _load(self.label, self.scale, self._count(), POST_WINDOW, self._post)

    def _count(self) -> int:
        return int(self.orthanc.statistics()["CountStudies"])

    def _post(self, start: int) -> int:
        url = f"{self.orthanc.url}/instances"
        limits = httpx.Limits(max_connections=POST_THREADS, max_keepalive_connections=POST_THREADS)
        with httpx.Client(timeout=60, limits=limits, trust_env=False) as http, \
                ThreadPoolExecutor(POST_THREADS, thread_name_prefix="orthanc-load") as pool, \
                _progress(self.label, self.scale, start) as bar:

            def post(study: ScaleStudy) -> None:
                response = http.post(url, content=study.dicom(), headers={"Content-Type": "application/dicom"})
                status = response.json().get("Status") if response.status_code == 200 else None
                if status not in ("Success", "AlreadyStored"):
                    raise RuntimeError(f"Orthanc refused study {study.index}: HTTP {response.status_code} "
                                       f"{response.text[:200]}")

            studies = self.scale.items(start)
            while window := list(islice(studies, POST_WINDOW)):
                list(pool.map(post, window))
                bar.update(len(window))
        return self._count()

    def stop(self) -> None:
        self.orthanc.stop()

    def describe(self) -> dict[str, object]:
        return {**self.orthanc.describe(), "directory": str(SCALE_ROOT / f"orthanc-{self.scale.tag}")}


def archives(scale: ScaleSet) -> list[ScaleGrid | ScaleOrthanc]:
    return [ScaleGrid(scale), ScaleOrthanc(scale)]


def report_dict(report: LoadReport) -> dict[str, Any]:
    return {**asdict(report), "cached": report.cached}
