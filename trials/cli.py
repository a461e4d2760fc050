"""``dicomgrid trial ...``: define imaging trials, their members and their pseudonym keys.

Nothing here prints or logs a key: ``show`` and ``--json`` give its fingerprint, and ``export-key`` writes
it to a file readable by its owner only, for another grid that serves the same trial (``--key-file``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from dicomgrid.trials.profile import OPTIONS, ProfileError
from dicomgrid.trials.store import Members, TrialError, TrialStore, check_members, parse_key


@contextmanager
def _store(ctx: Any) -> Iterator[TrialStore]:
    from dicomgrid.core.cassandra import Cassandra

    config = ctx.config
    db = Cassandra(config, local_dc=config.sites[0].cassandra_dc if config.sites else None)
    try:
        yield TrialStore(db, config)
    except (TrialError, ProfileError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        db.close()


def _options(values: tuple[str, ...]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _members(patients: tuple[str, ...], studies: tuple[str, ...]) -> Members:
    try:
        return check_members(patients, studies)
    except TrialError as exc:
        raise click.ClickException(str(exc)) from None


member_options = [
    click.option("--patient", "patients", multiple=True, metavar="ID", help="A Patient ID: all of its studies (repeatable)."),
    click.option("--study", "studies", multiple=True, metavar="UID", help="A Study Instance UID (repeatable)."),
]


def _with_members(f: Any) -> Any:
    for option in reversed(member_options):
        f = option(f)
    return f


@click.group()
def trial() -> None:
    """Imaging clinical trials: de-identified query/retrieve of a set of patients and studies."""


@trial.command("create")
@click.argument("name")
@click.option("--ae", "ae_title", required=True, help="The trial's called AE title on every site's DICOM port.")
@_with_members
@click.option("--options", "option_values", multiple=True, metavar="LIST",
              help="PS3.15 Annex E options, comma-separated or repeated: " + ", ".join(OPTIONS) + ".")
@click.option("--allow-identifying-pixels", is_flag=True,
              help="Also release instances whose pixels may show identity (burned-in annotation, photographs, "
                   "secondary capture, ultrasound, video, documents): withheld otherwise.")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Use this pseudonym key (hex, or at least 32 raw bytes) instead of a new one: for a trial "
                   "served by several grids, which then give the same pseudonyms.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (never the key).")
@click.pass_obj
def create(ctx: Any, name: str, ae_title: str, patients: tuple[str, ...], studies: tuple[str, ...],
           option_values: tuple[str, ...], allow_identifying_pixels: bool, key_file: Path | None,
           as_json: bool) -> None:
    """Create trial NAME served under --ae, with its members, options and a new (or supplied) key."""
    members = _members(patients, studies)
    try:
        key = parse_key(key_file.read_bytes()) if key_file else None
    except TrialError as exc:
        raise click.ClickException(str(exc)) from None
    with _store(ctx) as store:
        created = store.create(name, ae_title, _options(option_values), members, key=key,
                               allow_identifying_pixels=allow_identifying_pixels)
    summary = {**created.summary(), "patients": list(members.patients), "studies": list(members.studies)}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"trial {created.name} created: AE {created.ae_title}, options: "
                   f"{', '.join(created.options) or '(Basic Profile only)'}, key fingerprint {created.key_fingerprint}"
                   f"{' (supplied)' if key else ''}")


@trial.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_trials(ctx: Any, as_json: bool) -> None:
    """Every trial of the grid."""
    with _store(ctx) as store:
        trials = [t for t in (store.get(n) for n in store.names()) if t is not None]
    if as_json:
        click.echo(json.dumps([t.summary() for t in trials], indent=2))
        return
    for t in trials:
        click.echo(f"{t.name:<24} AE {t.ae_title:<16} {', '.join(t.options) or '(Basic Profile only)'}")


@trial.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def show(ctx: Any, name: str, as_json: bool) -> None:
    """A trial's definition, members and key fingerprint."""
    with _store(ctx) as store:
        found = store.get(name)
        if found is None:
            raise click.ClickException(f"no trial named {name}")
        members = store.members(name)
    summary = {**found.summary(), "patients": list(members.patients), "studies": list(members.studies)}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for field, value in summary.items():
        click.echo(f"{field:<26} {', '.join(value) if isinstance(value, list) else value}")


@trial.command("add")
@click.argument("name")
@_with_members
@click.pass_obj
def add(ctx: Any, name: str, patients: tuple[str, ...], studies: tuple[str, ...]) -> None:
    """Add patients or studies to a trial."""
    members = _members(patients, studies)
    with _store(ctx) as store:
        if store.get(name) is None:
            raise click.ClickException(f"no trial named {name}")
        store.add(name, members)
    click.echo(f"trial {name}: {len(members.patients)} patient(s), {len(members.studies)} study(ies) added")


@trial.command("remove")
@click.argument("name")
@_with_members
@click.pass_obj
def remove(ctx: Any, name: str, patients: tuple[str, ...], studies: tuple[str, ...]) -> None:
    """Remove patients or studies from a trial (what was released stays released)."""
    members = _members(patients, studies)
    with _store(ctx) as store:
        if store.get(name) is None:
            raise click.ClickException(f"no trial named {name}")
        store.remove(name, members)
    click.echo(f"trial {name}: {len(members.patients)} patient(s), {len(members.studies)} study(ies) removed")


@trial.command("export-key")
@click.argument("name")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A new file (mode 0600) for the key, as hex: give it to `trial create --key-file` on another grid.")
@click.pass_obj
def export_key(ctx: Any, name: str, out: Path) -> None:
    """Write a trial's pseudonym key to a new file readable by its owner only."""
    with _store(ctx) as store:
        found = store.get(name)
        if found is None:
            raise click.ClickException(f"no trial named {name}")
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise click.ClickException(f"{out} exists; not overwriting a key file") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(found.key.hex() + "\n")
    click.echo(f"key of trial {name} (fingerprint {found.key_fingerprint}) written to {out}", err=True)
