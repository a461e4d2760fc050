"""The ``dicomgrid`` command: run the local cluster, apply the schema, run and seed the grid."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import click

from dicomgrid.core.config import GridConfig, load_config
from dicomgrid.core.logging import configure_logging


class Context:
    def __init__(self, config_file: str | None, log_level: str | None) -> None:
        self.config_file = config_file
        self.log_level = log_level
        self._config: GridConfig | None = None

    @property
    def config(self) -> GridConfig:
        if self._config is None:
            try:
                self._config = load_config(self.config_file)
            except Exception as exc:
                raise click.ClickException(f"invalid configuration: {exc}") from exc
        return self._config


pass_ctx = click.make_pass_decorator(Context)


@click.group()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), envvar="DICOMGRID_CONFIG",
              help="Grid config (TOML). Default: the shipped two-site localhost grid.")
@click.option("--log-level", default=None, help="Override the configured log level.")
@click.pass_context
def main(ctx: click.Context, config_file: str | None, log_level: str | None) -> None:
    """dicomgrid: archive and distribute DICOM studies across hospital sites."""
    ctx.obj = Context(config_file, log_level)


def _logging(ctx: Context) -> None:
    configure_logging(ctx.log_level or ctx.config.log_level)


# -- infra -------------------------------------------------------------------------------------------


@main.group()
def infra() -> None:
    """The local Kafka + Cassandra cluster (JVM processes, no Docker)."""


def _cluster(ctx: Context):  # noqa: ANN202 - imported lazily: only infra commands need it
    from dicomgrid.deploy.local import LocalCluster

    return LocalCluster(ctx.config)


@infra.command("up")
@click.option("--dcs", type=click.IntRange(1, 9), default=None, help="Cassandra datacenters (one node each).")
@pass_ctx
def infra_up(ctx: Context, dcs: int | None) -> None:
    """Start Kafka and Cassandra, reusing what already runs and is healthy."""
    from dicomgrid.deploy.local import InfraError

    started = time.monotonic()
    try:
        status = _cluster(ctx).up(dcs=dcs)
    except InfraError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(status.render())
    click.echo(f"infra ready in {time.monotonic() - started:.1f}s")


@infra.command("fetch")
@pass_ctx
def infra_fetch(ctx: Context) -> None:
    """Download the Kafka and Cassandra jars from Maven Central (cached; a no-op once done)."""
    from dicomgrid.deploy.local import InfraError
    from dicomgrid.deploy.local.jars import resolve

    infra_config = ctx.config.infra
    try:
        for kind, version in (("kafka", infra_config.kafka_version), ("cassandra", infra_config.cassandra_version)):
            click.echo(f"{kind} {version}: {resolve(ctx.config.root, kind, version)}")
    except InfraError as exc:
        raise click.ClickException(str(exc)) from exc


@infra.command("status")
@pass_ctx
def infra_status(ctx: Context) -> None:
    """Health of Kafka and of every Cassandra datacenter; exit 1 when anything is down."""
    status = _cluster(ctx).status()
    click.echo(status.render())
    sys.exit(0 if status.healthy else 1)


@infra.command("down")
@pass_ctx
def infra_down(ctx: Context) -> None:
    """Stop Kafka and Cassandra cleanly (data is kept)."""
    _cluster(ctx).down()
    click.echo("infra stopped")


# -- schema ------------------------------------------------------------------------------------------


@main.group()
def schema() -> None:
    """The public contract: CQL tables and Kafka topics."""


@schema.command("apply")
@pass_ctx
def schema_apply(ctx: Context) -> None:
    """Create the keyspace, tables, indexes and topics that do not exist yet (idempotent)."""
    from dicomgrid.core.kafka import TopicsNotServing, ensure_topics
    from dicomgrid.core.metadata import apply_schema

    _logging(ctx)
    statements = apply_schema(ctx.config)
    try:
        created = ensure_topics(ctx.config.kafka)
    except TopicsNotServing as exc:
        raise click.ClickException(f"kafka: {exc}") from exc
    click.echo(f"cassandra: {statements} statements applied to keyspace {ctx.config.cassandra.keyspace}")
    click.echo(f"kafka: {len(created)} topic(s) created" + (f": {', '.join(created)}" if created else ""))


# -- grid services -----------------------------------------------------------------------------------


def _supervisor(ctx: Context):  # noqa: ANN202
    from dicomgrid.supervisor import Supervisor

    return Supervisor(ctx.config, ctx.config_file)


def _print_sites(config: GridConfig) -> None:
    for site in config.sites:
        click.echo(
            f"site {site.name}: AE {site.ae_title} at {site.dicom_host}:{site.dicom_port}, "
            f"DICOMweb http://{site.http_host}:{site.http_port}/dicomweb, Cassandra {site.cassandra_dc}, "
            f"blobs {config.site_storage(site.name)}"
        )


@main.command("up")
@click.option("--detach", is_flag=True, help="Return once every service is healthy.")
@pass_ctx
def up(ctx: Context, detach: bool) -> None:
    """Start every site's services (receivers, DICOMweb, stream processors)."""
    supervisor = _supervisor(ctx)
    try:
        supervisor.up()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_sites(ctx.config)
    allowed = ", ".join(ctx.config.security.allowed_calling_aes) or "(any)"
    click.echo(f"point a PACS at any site above; allowed calling AE titles: {allowed}")
    if detach:
        return
    click.echo("grid running; Ctrl-C stops it")
    stop = {"now": False}

    def _stop(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while not stop["now"]:
        time.sleep(0.5)
    click.echo("stopping grid services")
    supervisor.down()


@main.command("down")
@pass_ctx
def down(ctx: Context) -> None:
    """Stop every site's services."""
    _supervisor(ctx).down()
    click.echo("grid services stopped")


@main.command("status")
@pass_ctx
def status(ctx: Context) -> None:
    """Sites, their services, and the infrastructure."""
    all_ok = True
    for entry in _supervisor(ctx).status():
        state = "UP" if entry.healthy else ("STARTING" if entry.running else "DOWN")
        all_ok &= entry.healthy
        click.echo(f"{entry.service.name:<16} {state:<9} pid={entry.pid or '-':<8} {entry.detail}")
    infra_state = _cluster(ctx).status()
    click.echo(infra_state.render())
    sys.exit(0 if all_ok and infra_state.healthy else 1)


# -- individual services (what `up` runs) ---------------------------------------------------------


@main.group()
def serve() -> None:
    """Run one service of one site in the foreground."""


@serve.command("receiver")
@click.option("--site", required=True)
@click.option("--reuse-port", is_flag=True, help="Share the DICOM port with other receiver processes.")
@pass_ctx
def serve_receiver(ctx: Context, site: str, reuse_port: bool) -> None:
    """The DICOM services of one site: C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET."""
    from dicomgrid.consumers import dimse_services
    from dicomgrid.core.dimse import SiteAE
    from dicomgrid.producers.site import build_ingestor, build_site_context
    from dicomgrid.producers.storage_scp import StorageService

    _logging(ctx)
    ingestor = build_ingestor(ctx.config, site)
    storage = StorageService(ingestor, ctx.config.site(site).ae_title)
    services = [storage, *dimse_services(build_site_context(ctx.config, site, ingestor))]
    # SIGTERM (the supervisor's stop) unwinds like Ctrl-C, so queued audit records are delivered.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        SiteAE(ctx.config, site, services, ingestor.audit).serve(spool_dir=storage.spool_dir, reuse_port=reuse_port)
    finally:
        ingestor.flush()


@serve.command("http")
@click.option("--site", required=True)
@pass_ctx
def serve_http(ctx: Context, site: str) -> None:
    """DICOMweb (STOW-RS, QIDO-RS, WADO-RS) of one site."""
    import uvicorn

    from dicomgrid.http import create_http_app
    from dicomgrid.producers.site import build_ingestor

    _logging(ctx)
    site_config = ctx.config.site(site)
    app = create_http_app(ctx.config, site, build_ingestor(ctx.config, site))
    uvicorn.run(app, host=site_config.http_host, port=site_config.http_port, log_config=None, access_log=False)


@serve.command("processors")
@click.option("--site", required=True)
@pass_ctx
def serve_processors(ctx: Context, site: str) -> None:
    """Stream processors (indexer) of one site's worker."""
    import faust

    from dicomgrid.processors.app import create_app

    _logging(ctx)
    app = create_app(ctx.config, site)
    worker = faust.Worker(app, loglevel=ctx.config.log_level.lower(), quiet=True)
    worker.execute_from_commandline()


# -- seeding -----------------------------------------------------------------------------------------


@main.command("seed")
@click.option("--site", default=None, help="Site to send to (default: the first).")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@pass_ctx
def seed(ctx: Context, site: str | None, paths: tuple[str, ...]) -> None:
    """Push sample studies to a site with C-STORE, as a PACS would (default: pydicom's test files)."""
    from dicomgrid.producers.seed import sample_files, send_files

    _logging(ctx)
    site_config = ctx.config.site(site) if site else ctx.config.sites[0]
    files = [Path(p) for p in paths] if paths else sample_files()
    report = send_files(site_config, files)
    click.echo(report.render())
    if report.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
