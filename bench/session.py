"""One benchmark session: its options, its corpora, and every target running for its whole duration.

Targets are started once and stay up, idle while another is measured, so a run never pays a start-up;
the grid's receiver-count variants share one grid (see :mod:`bench.grid`). The two-site grid is a target
too (the ingest figure of the default layout, replication on) and the grid of the replication and
healing sections (:meth:`Session.sites_grid`).
"""

from __future__ import annotations

import fcntl
import os
import platform
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.corpus import Corpus, CorpusSpec
from bench.grid import TWO_SITES, BenchGrid, GridTarget, SitesTarget
from bench.paths import BENCH_ROOT, LOGS
from bench.retired import purge
from bench.targets import Orthanc, StoreSCP, Target

# Pause between runs, after flushing dirty pages: one target's unsynced writes (storescp does not
# fsync) must not be written back while the next one is measured.
SETTLE_S = 1.0


@dataclass(frozen=True)
class Options:
    repetitions: int = 3
    small: int = 500
    large: int = 100
    associations: tuple[int, ...] = (1, 4)
    grid_receivers: tuple[int, ...] = (1, 2)
    warmup: int = 10
    jvm_warmup: int = 500  # small instances per batch of the ingest section's JVM warm-up (0: none)
    queries: int = 200  # C-FINDs per association for a one-match query (a tenth for many matches)
    profile: bool = True
    scales: tuple[int, ...] = (10_000, 100_000)  # studies in the metadata-scale sets (C-FIND latency)
    retrieve_instances: int = 200  # instances of the study retrieved by C-GET and WADO-RS
    lag_instances: int = 200  # instances stored at site A, one at a time, for the cross-site lag
    lag_gap_s: float = 0.05  # pause between two of them
    lag_sample_every: int = 10  # every n-th of them is also looked up by site A's own C-FIND
    lag_stream: int = 500  # instances of each paced stream into site A (replication lag under load)
    backlog_small: int = 1000  # instances of the small-CT replication backlog
    backlog_large: int = 1000  # instances of the large-CT replication backlog (0: not measured)
    backlog_concurrency: tuple[int, ...] = (16,)  # B's worker also measured at these concurrencies
    healing_small: int = 1000  # ~40 KB instances recovered onto an emptied site B (healing section)
    healing_large: int = 100  # ~0.5 MB instances recovered onto it

    @property
    def corpora(self) -> list[CorpusSpec]:
        """~40 KB and ~0.5 MB CT images (16-bit, Explicit VR Little Endian)."""
        return [
            CorpusSpec("small", self.small, 140, 140, studies=5, seed=1),
            CorpusSpec("large", self.large, 512, 512, studies=1, seed=2),
        ]

    @property
    def retrieve_study(self) -> CorpusSpec:
        """One study of small (~40 KB) CT instances, for C-GET and WADO-RS."""
        return CorpusSpec("study", self.retrieve_instances, 140, 140, studies=1, seed=3)

    @property
    def lag_corpus(self) -> CorpusSpec:
        """Small CT instances sent one at a time to site A of the two-site grid."""
        return CorpusSpec("lag", self.lag_instances, 140, 140, studies=1, seed=4)

    @property
    def stream_corpus(self) -> CorpusSpec:
        """Small CT instances streamed into site A at the ingest section's rates."""
        return CorpusSpec("stream", self.lag_stream, 140, 140, studies=5, seed=5)

    @property
    def backlog_corpora(self) -> list[CorpusSpec]:
        """The replication backlogs: ~40 KB and ~0.5 MB CT images, like the ingest corpora."""
        specs = [CorpusSpec("backlog-small", self.backlog_small, 140, 140, studies=5, seed=6)]
        if self.backlog_large:
            specs.append(CorpusSpec("backlog-large", self.backlog_large, 512, 512, studies=2, seed=7))
        return specs


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One benchmark at a time: sessions share the bench grid's name, ports and storage."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another benchmark is running (lock {path})") from None
        yield


class Session:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.log_dir = LOGS
        self.grid = BenchGrid()
        # The two-site grid: a target of the ingest section (the default layout's figure) and the grid of
        # the replication and healing sections.
        self._sites = BenchGrid(TWO_SITES)
        self.targets: list[Target] = [
            StoreSCP(),
            Orthanc(),
            *(GridTarget(self.grid, n) for n in options.grid_receivers),
            SitesTarget(self._sites),
        ]
        self.corpora = [Corpus.load(spec) for spec in options.corpora]
        self._corpora = {c.spec: c for c in self.corpora}
        # State scenarios share within the session (e.g. the reference studies of query and retrieve).
        self.shared: dict[str, Any] = {}
        self._stack = ExitStack()

    def __enter__(self) -> "Session":
        with ExitStack() as stack:
            stack.enter_context(_exclusive(BENCH_ROOT / "bench.lock"))
            for target in self.targets:
                # Stopped even when its start fails half-way: a grid whose services are up but whose index
                # did not answer would otherwise outlive the benchmark.
                stack.callback(target.stop)
                target.start()
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack.close()
        finally:
            purge()  # nothing is measured any more

    def versions(self) -> dict[str, str]:
        """Versions of everything measured (the client's DCMTK is in the machine description)."""
        out = {"Python": platform.python_version(), **self.grid.versions()}
        for target in self.targets:
            if not isinstance(target, GridTarget):
                described = target.describe()
                out[target.label] = str(described["version"])
                for plugin, version in dict(described.get("plugins", {})).items():
                    out[f"{target.label} {plugin} plugin"] = str(version)
        return out

    def sites_grid(self) -> BenchGrid:
        """The two-site grid (:data:`bench.grid.TWO_SITES`), started on first use, stopped with the session."""
        self._sites.start()  # started with the session's targets; a no-op then
        return self._sites

    def target(self, key: str) -> Target:
        return next(t for t in self.targets if t.key == key)

    def corpus(self, spec: CorpusSpec) -> Corpus:
        """A corpus other than the ingest ones (built and cached on first use)."""
        if spec not in self._corpora:
            self._corpora[spec] = Corpus.load(spec)
        return self._corpora[spec]

    @staticmethod
    def settle() -> None:
        os.sync()
        time.sleep(SETTLE_S)
