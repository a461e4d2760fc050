"""What earlier benchmark runs measured, for sections that load the grid at a rate another section found.

The replication lag is measured while site A ingests at the rates the ingest section measured for the
grid: this session's, when the ingest section ran in it, else those of the newest full (not ``--quick``)
run in ``bench/results/``, else :data:`FALLBACK_RATES`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The grid's small-corpus ingest rates (instances/s) of the last full run before the results kept here.
FALLBACK_RATES = {1: 108.0, 4: 143.0}


@dataclass(frozen=True)
class Rate:
    associations: int
    instances_per_s: float
    source: str  # where the rate comes from, for the results


def full_runs(results: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) of every full run kept in ``results``, newest first."""
    out = []
    for path in sorted(results.glob("*.json"), reverse=True):
        if path.name == "latest.json":
            continue
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not document.get("options", {}).get("quick", True):
            out.append((path.name, document))
    return out


def _grid_rate(rows: Iterable[dict[str, Any]], corpus: str, associations: int) -> float | None:
    for row in rows:
        if (row.get("target"), row.get("corpus"), row.get("associations")) == ("grid", corpus, associations):
            rate = row.get("instances_per_s")
            if isinstance(rate, (int, float)) and rate > 0:
                return float(rate)
    return None


def ingest_rates(
    associations: Sequence[int],
    session_rows: list[dict[str, Any]] | None,
    documents: list[tuple[str, dict[str, Any]]],
    corpus: str = "small",
) -> list[Rate]:
    """The grid's ingest rate for ``corpus`` at each association count, from the first source that has it."""
    out = []
    for n in associations:
        rate, source = None, ""
        if session_rows:
            rate, source = _grid_rate(session_rows, corpus, n), "this run's ingest section"
        if rate is None:
            for name, document in documents:
                rows = document.get("sections", {}).get("ingest", {}).get("rows", [])
                rate = _grid_rate(rows, corpus, n)
                if rate is not None:
                    source = f"ingest section of the full run {name.removesuffix('.json')}"
                    break
        if rate is None:
            rate, source = FALLBACK_RATES.get(n, FALLBACK_RATES[max(FALLBACK_RATES)]), "fallback (no results kept)"
        out.append(Rate(n, rate, source))
    return out
