"""Results as Markdown and JSON under ``bench/results/``: ``latest.*`` plus a timestamped copy."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.paths import RESULTS

if TYPE_CHECKING:
    from bench.sections import Section


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _deletion(deletion: dict[str, Any] | None) -> str:
    """When the bench last deleted files on this disk (see :mod:`bench.retired`)."""
    since = (deletion or {}).get("since_purge_s")
    if since is None:
        return "- Files deleted by an earlier session: none recorded (no store deleted during the session)."
    waited = deletion.get("waited_s") or 0  # type: ignore[union-attr]
    return (f"- Files deleted by an earlier session: {since:.0f} s before the start, after waiting {waited:.0f} s "
            "for them to age out (no store deleted during the session).")


def render(started: str, header: dict[str, Any], sections: list["Section"]) -> str:
    machine = header["machine"]
    quiet = header["quiet"]
    versions = header["versions"]
    lines = [
        f"# dicomgrid benchmark, {started}",
        "",
        f"- Machine: {machine['cpu_model']}, {machine['cores_logical']} logical cores, {machine['ram_gib']} GiB RAM, "
        f"Linux {machine['kernel']} ({machine['os']}), storage {machine['storage']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Load average (1 min) at start: {quiet['load_1m']:.2f} after waiting {quiet['waited_s']:.0f} s "
        f"({'quiet' if quiet['reached'] else 'NOT quiet: limit reached'}; other grid services running: "
        f"{quiet['other_grid_services']}). Per-run loads (which include the benchmark's own processes) and "
        "counts of other grids' services are in the JSON.",
        _deletion(header.get("deletion")),
        f"- Options: {header['options']}",
        "",
    ]
    for section in sections:
        lines += [f"## {section.title}", "", section.markdown.rstrip(), ""]
    return "\n".join(lines)


def write(started: str, header: dict[str, Any], sections: list["Section"], results: Path = RESULTS) -> Path:
    """Write ``latest.md`` / ``latest.json`` and their timestamped copies; return the Markdown path."""
    results.mkdir(parents=True, exist_ok=True)
    stamp = started.replace(":", "-")
    markdown = render(started, header, sections)
    document = {**header, "started": started, "sections": {s.key: {"title": s.title, "available": s.available,
                                                                    **s.data} for s in sections}}
    latest_md, latest_json = results / "latest.md", results / "latest.json"
    latest_md.write_text(markdown)
    latest_json.write_text(json.dumps(document, indent=1, default=str) + "\n")
    shutil.copyfile(latest_md, results / f"{stamp}.md")
    shutil.copyfile(latest_json, results / f"{stamp}.json")
    return latest_md
