"""Where the harness keeps its files.

Everything the benchmark writes at run time lives under ``bench/`` in the grid's data directory
(``.dicomgrid/`` unless ``DICOMGRID_DATA_DIR`` says otherwise), on the same file system as the grid's
blob store, so every target writes to the same disk. It sits beside what it belongs to: the bench grids'
run directories and keyspaces are in that data directory and its cluster, so two checkouts sharing one
cluster also share the bench's lock, corpora and cached scale sets (and never run two benchmarks at once). Per-run copies of
the corpus that storescu reads go to ``/dev/shm`` when it exists: writing them there leaves no dirty
pages whose write-back would compete with the fsyncs of the target being measured.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dicomgrid.core.config import load_config

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BENCH_ROOT = load_config().root / "bench"
CORPUS_CACHE = BENCH_ROOT / "corpus"
LOGS = BENCH_ROOT / "logs"


def scratch_dir(prefix: str) -> Path:
    """A fresh directory on the benchmark's disk (targets' storage, profiles)."""
    (BENCH_ROOT / "tmp").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=BENCH_ROOT / "tmp"))


def send_dir(prefix: str) -> Path:
    """A fresh directory for the files storescu sends: memory-backed when possible."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else BENCH_ROOT / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
