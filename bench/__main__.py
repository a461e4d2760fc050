"""``python -m bench`` (``make bench``): run every scenario, write ``bench/results/``, print the summary.

``--quick`` is a smoke run of everything (one repetition, small corpora, no waiting for a quiet
machine); its numbers are not meant to be compared.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import click

from bench import report
from bench.machine import Machine, wait_until_quiet
from bench.paths import BENCH_ROOT
from bench.registry import SCENARIOS
from bench.session import Options, Session


@click.command()
@click.option("--quick", is_flag=True, help="Smoke run: 1 repetition, 40 small + 8 large instances, no quiet wait.")
@click.option("--repetitions", type=click.IntRange(1), default=None, help="Repetitions per run (default 3).")
@click.option("--small", type=click.IntRange(4), default=None, help="Instances in the ~40 KB corpus (default 500).")
@click.option("--large", type=click.IntRange(4), default=None, help="Instances in the ~0.5 MB corpus (default 100).")
@click.option("--max-load", type=float, default=1.0, show_default=True,
              help="Wait until the 1-minute load average is at most this before measuring.")
@click.option("--max-wait", type=click.IntRange(0), default=600, show_default=True,
              help="Give up waiting for a quiet machine after this many seconds (then measure anyway).")
@click.option("--profile/--no-profile", default=True, show_default=True, help="Profile the grid receiver (py-spy).")
@click.option("--scenario", "only", multiple=True, type=click.Choice([s.key for s in SCENARIOS]),
              help="Run only these scenarios (repeatable). Default: all.")
def main(quick: bool, repetitions: int | None, small: int | None, large: int | None, max_load: float,
         max_wait: int, profile: bool, only: tuple[str, ...]) -> None:
    """Ingest throughput of dicomgrid against DCMTK storescp and Orthanc, plus the receiver's profile."""
    options = Options(
        repetitions=repetitions or (1 if quick else 3),
        small=small or (40 if quick else 500),
        large=large or (8 if quick else 100),
        warmup=5 if quick else 10,
        queries=20 if quick else 200,
        profile=profile,
    )
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = Machine.describe()
    quiet = wait_until_quiet(max_load, 0 if quick else max_wait, own_marker=str(BENCH_ROOT))
    click.echo(f"load average {quiet.load_1m:.2f}, other grid services {quiet.other_grid_services}"
               + ("" if quiet.reached else f" (not quiet after {quiet.waited_s:.0f} s; measuring anyway)"))
    scenarios = [s for s in SCENARIOS if not only or s.key in only]
    with Session(options) as session:
        sections = []
        for scenario in scenarios:
            click.echo(f"== {scenario.title}")
            sections.append(scenario.run(session))
        versions = session.versions()
    header = {
        "machine": machine.as_dict(),
        "versions": versions,
        "quiet": asdict(quiet),
        "options": {**asdict(options), "quick": quick},
    }
    path = report.write(started, header, sections)
    for section in sections:
        if section.key == "ingest":
            click.echo(section.markdown.split("### Goals")[0])
        for line in section.summary:
            click.echo(f"{section.key}: {line}")
    click.echo(f"results: {path} (and {path.with_suffix('.json').name})")


if __name__ == "__main__":
    main()
