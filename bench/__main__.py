"""``python -m bench`` (``make bench``): run every scenario, write ``bench/results/``, print the summary.

``--quick`` is a smoke run of everything (one repetition, small corpora, a 1000-study C-FIND scale
set, 20 instances one at a time and streams of 40 for the replication lag, replication backlogs of 100
small and 20 large instances, 100 small and 20 large instances recovered and scrubbed, no waiting for a quiet machine); its numbers are not meant to be compared.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import click

from bench import report
from bench.machine import Machine, wait_until_quiet
from bench.paths import BENCH_ROOT
from bench.registry import SCENARIOS
from bench.retired import RECENTLY_DELETED_S, since_purge, wait_since_purge
from bench.session import Options, Session


def _scales(value: str | None) -> tuple[int, ...] | None:
    """``--scale 10000,100000`` (``10_000`` also reads); None when not given."""
    if value is None:
        return None
    try:
        scales = tuple(int(part.replace("_", "")) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of study counts") from None
    if not scales or min(scales) < 1:
        raise click.BadParameter("give at least one positive study count")
    return scales


@click.command()
@click.option("--quick", is_flag=True,
              help="Smoke run: 1 repetition, 40 small + 8 large instances, 1000-study C-FIND set, "
                   "20 + 2x40 replication-lag instances, backlogs of 100 small + 20 large, healing of 100 small + 20 large, "
                   "no quiet wait.")
@click.option("--repetitions", type=click.IntRange(1), default=None, help="Repetitions per run (default 3).")
@click.option("--small", type=click.IntRange(4), default=None, help="Instances in the ~40 KB corpus (default 500).")
@click.option("--large", type=click.IntRange(4), default=None, help="Instances in the ~0.5 MB corpus (default 100).")
@click.option("--max-load", type=float, default=1.0, show_default=True,
              help="Wait until the 1-minute load average is at most this before measuring.")
@click.option("--max-wait", type=click.IntRange(0), default=600, show_default=True,
              help="Give up waiting for a quiet machine after this many seconds (then measure anyway).")
@click.option("--backlog", type=click.IntRange(1), default=None,
              help="Instances in the small-CT replication backlog (default 1000).")
@click.option("--backlog-large", type=click.IntRange(0), default=None,
              help="Instances in the large-CT replication backlog, 0 to skip it (default 1000).")
@click.option("--backlog-concurrency", "backlog_concurrency", type=click.IntRange(0, 64), multiple=True,
              help="Also measure the backlog with B's replication worker at this concurrency (repeatable; "
                   "default 16; 0: only the grid's configured value, which is always measured).")
@click.option("--profile/--no-profile", default=True, show_default=True,
              help="Profile the grid receiver and the replication worker (py-spy).")
@click.option("--scale", "scales", callback=lambda ctx, param, value: _scales(value), default=None,
              help="Studies in the metadata-scale C-FIND sets, comma-separated (default 10000,100000; "
                   "quick: 1000). Loaded once, then reused.")
@click.option("--scenario", "only", multiple=True, type=click.Choice([s.key for s in SCENARIOS]),
              help="Run only these scenarios (repeatable). Default: all.")
def main(quick: bool, repetitions: int | None, small: int | None, large: int | None, max_load: float,
         max_wait: int, backlog: int | None, backlog_large: int | None, backlog_concurrency: tuple[int, ...],
         profile: bool,
         scales: tuple[int, ...] | None, only: tuple[str, ...]) -> None:
    """dicomgrid against DCMTK storescp and Orthanc: ingest (and the receiver's profile), C-FIND (also at
    metadata scale), C-GET and WADO-RS, payload replication lag between two sites and the throughput of a
    replication backlog (against Orthanc-to-Orthanc peer transfer), and self-healing (recovering an emptied
    site, the scrub rate)."""
    options = Options(
        repetitions=repetitions or (1 if quick else 3),
        small=small or (40 if quick else 500),
        large=large or (8 if quick else 100),
        warmup=5 if quick else 10,
        jvm_warmup=0 if quick else 500,
        queries=20 if quick else 200,
        profile=profile,
        scales=scales or ((1000,) if quick else (10_000, 100_000)),
        lag_instances=20 if quick else 200,
        lag_sample_every=4 if quick else 10,
        lag_stream=40 if quick else 500,
        backlog_small=backlog or (100 if quick else 1000),
        backlog_large=(20 if quick else 1000) if backlog_large is None else backlog_large,
        backlog_concurrency=tuple(n for n in backlog_concurrency if n) if backlog_concurrency else (16,),
        healing_small=100 if quick else 1000,
        healing_large=20 if quick else 100,
    )
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = Machine.describe()
    quiet = wait_until_quiet(max_load, 0 if quick else max_wait, own_marker=str(BENCH_ROOT))
    click.echo(f"load average {quiet.load_1m:.2f}, other grid services {quiet.other_grid_services}"
               + ("" if quiet.reached else f" (not quiet after {quiet.waited_s:.0f} s; measuring anyway)"))
    # Files an earlier session deleted make every file creation on this disk costly for minutes.
    aged = wait_since_purge(0 if quick else RECENTLY_DELETED_S)
    if aged:
        click.echo(f"waited {aged:.0f} s for the files an earlier session deleted to age out (bench.retired)")
    deletion = {"since_purge_s": since_purge(), "waited_s": round(aged, 1)}
    scenarios = [s for s in SCENARIOS if not only or s.key in only]
    with Session(options) as session:
        # Asked first: a cluster restarted by someone else late in a long run must not cost its results.
        versions = session.versions()
        sections = []
        for scenario in scenarios:
            click.echo(f"== {scenario.title}")
            sections.append(scenario.run(session))
    header = {
        "machine": machine.as_dict(),
        "versions": versions,
        "quiet": asdict(quiet),
        "deletion": deletion,
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
