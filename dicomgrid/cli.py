"""The ``dicomgrid`` command: run the local cluster, apply the schema, run and seed the grid."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from dicomgrid.core.config import GridConfig, load_config
from dicomgrid.core.logging import configure_logging


class Context:
    def __init__(self, config_file: str | None, log_level: str | None, log_file: str | None = None) -> None:
        self.config_file = config_file
        self.log_level = log_level
        self.log_file = log_file
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
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Log to this file (appended, rotated by size as [logs] says) instead of stderr.")
@click.pass_context
def main(ctx: click.Context, config_file: str | None, log_level: str | None, log_file: str | None) -> None:
    """dicomgrid: archive and distribute DICOM studies across hospital sites."""
    ctx.obj = Context(config_file, log_level, log_file)


def _startable(ctx: Context) -> None:
    """Refuse to start services with a production config that still carries development material; in
    development, make the key material that is missing (a local CA, certificates, token keys)."""
    from dicomgrid.core import pki
    from dicomgrid.core.production import refusal

    message = refusal(ctx.config)
    if message:
        raise click.ClickException(message)
    missing = pki.missing_material(ctx.config)
    if missing and ctx.config.environment == "development":
        try:
            pki.ensure_material(ctx.config)
        except pki.KeyMaterialError as exc:
            raise click.ClickException(str(exc)) from exc
    elif missing:
        raise click.ClickException(f"key material missing: {missing[0]}" + (
            f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def _logging(ctx: Context) -> None:
    logs = ctx.config.logs
    configure_logging(
        ctx.log_level or ctx.config.log_level,
        log_file=Path(ctx.log_file) if ctx.log_file else None,
        max_bytes=logs.max_bytes,
        backups=logs.backups,
        redact_phi=logs.redact_phi,
    )


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
    """Download the Kafka, Cassandra and MirrorMaker 2 jars from Maven Central (cached; a no-op once done).

    MirrorMaker runs only with a Kafka cluster per site, but the test suite runs that layout too."""
    from dicomgrid.deploy.local import InfraError
    from dicomgrid.deploy.local.jars import resolve

    infra_config = ctx.config.infra
    kinds = [("kafka", infra_config.kafka_version), ("cassandra", infra_config.cassandra_version),
             ("mirrormaker", infra_config.kafka_version)]
    try:
        for kind, version in kinds:
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
    from dicomgrid.core.cassandra import apply_schema
    from dicomgrid.core.kafka import TopicsNotServing, ensure_grid_topics

    _logging(ctx)
    statements = apply_schema(ctx.config)
    try:
        created = ensure_grid_topics(ctx.config)
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
        ports = [f"{site.dicom_host}:{site.dicom_port}"] if config.tls.plain_dicom else []
        if config.dicom_tls_port(site.name):
            ports.append(f"{site.dicom_host}:{site.dicom_tls_port} (TLS)")
        click.echo(
            f"site {site.name}: AE {site.ae_title} at {', '.join(ports)}, "
            f"DICOMweb {config.http_url(site.name)}/dicomweb, Cassandra {site.cassandra_dc}, "
            f"blobs {config.site_storage(site.name)}"
        )
    if config.tls.dicom or config.tls.http:
        click.echo(f"TLS: certificates chain to {config.tls_ca_file}")
    if config.security.require_tokens:
        click.echo("DICOMweb wants a bearer token: `dicomgrid token issue --scope read`")


def _require_schema(config: GridConfig) -> None:
    """Refuse to start services on a cluster without the grid's topics and tables: they would wait."""
    from confluent_kafka import KafkaException

    from dicomgrid.core.cassandra import missing_tables
    from dicomgrid.core.kafka import mirrored_from, missing_topics

    kafka = config.kafka
    try:
        missing = []
        for site in config.sites if config.kafka_per_site else []:
            kafka = config.site_kafka(site.name)
            missing += missing_topics(kafka, mirrored_from=mirrored_from(config, site.name))
        kafka = config.kafka
        if not config.kafka_per_site:
            missing += missing_topics(kafka)
        missing += missing_tables(config)
    except KafkaException as exc:
        raise click.ClickException(f"Kafka at {kafka.bootstrap_servers} is not answering: {exc}") from exc
    except Exception as exc:  # the driver's NoHostAvailable and friends
        raise click.ClickException(f"Cassandra is not answering: {exc}") from exc
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise click.ClickException(f"the grid's schema is not applied ({shown} missing): run `dicomgrid schema apply`")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    return stop


@main.command("up")
@click.option("--detach", is_flag=True,
              help="Return once every service is healthy; a background supervisor keeps restarting them.")
@pass_ctx
def up(ctx: Context, detach: bool) -> None:
    """Start every site's services (receivers, DICOMweb, stream processors, replication workers) and
    restart any that exits."""
    _startable(ctx)
    _require_schema(ctx.config)
    supervisor = _supervisor(ctx)
    if detach:
        try:
            supervisor.up()
        except RuntimeError as exc:
            raise click.ClickException(str(exc)) from exc
    else:
        _logging(ctx)
        stop = _stop_on_signals()
        supervisor.take_over()
        exits = supervisor.exits()
        loop = threading.Thread(target=supervisor.supervise, args=(stop,), name="supervisor")
        loop.start()
        try:
            supervisor.wait_healthy(exits=exits)
        except RuntimeError as exc:
            stop.set()
            loop.join()
            supervisor.supervisor_daemon().pid_file.unlink(missing_ok=True)
            raise click.ClickException(str(exc)) from exc
    _print_sites(ctx.config)
    allowed = ", ".join(ctx.config.security.allowed_calling_aes) or "(any)"
    click.echo(f"point a PACS at any site above; allowed calling AE titles: {allowed}")
    if detach:
        return
    click.echo("grid running, crashed services are restarted; Ctrl-C stops it")
    stop.wait()
    loop.join()
    click.echo("stopping grid services")
    supervisor.down()


@main.command("supervise")
@pass_ctx
def supervise(ctx: Context) -> None:
    """The supervisor loop alone, in the foreground (what `up --detach` runs in the background)."""
    _startable(ctx)
    _logging(ctx)
    stop = _stop_on_signals()
    _supervisor(ctx).supervise(stop)


@main.command("down")
@pass_ctx
def down(ctx: Context) -> None:
    """Stop every site's services."""
    _supervisor(ctx).down()
    click.echo("grid services stopped")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    """Sites, their services, the infrastructure, ingest rate and replication (exit 1 if anything is down)."""
    import json as json_module

    from dicomgrid.consumers.grid_status import collect, service_states
    from dicomgrid.core.audit_log import AuditLog
    from dicomgrid.core.cassandra import Cassandra
    from dicomgrid.core.ledger import ReplicaLedger
    from dicomgrid.core.links import partition_lines

    supervisor = _supervisor(ctx)
    supervisor_pid = supervisor.supervisor_pid()
    services = service_states(supervisor.status())
    infra_state = _cluster(ctx).status()
    # With a Kafka cluster per site: links between sites that are down (MirrorMaker, payload endpoints).
    partitions = partition_lines(ctx.config)
    degraded = _degraded(ctx.config, infra_state) + partitions
    db = Cassandra(ctx.config, local_dc=ctx.config.sites[0].cassandra_dc if ctx.config.sites else None)
    try:
        grid = collect(ctx.config, ReplicaLedger(db), AuditLog(db), services)
    finally:
        db.close()
    all_ok = supervisor_pid is not None and all(s.state == "UP" for s in services) and infra_state.healthy \
        and not partitions
    if as_json:
        out = grid.as_dict()
        out.pop("recent_audit")
        out.update(supervisor_pid=supervisor_pid, infra=[{"name": c.name, "healthy": c.healthy}
                                                          for c in infra_state.components],
                   degraded=degraded, ok=all_ok)
        click.echo(json_module.dumps(out, indent=2, default=str))
        sys.exit(0 if all_ok else 1)
    click.echo(f"{'supervisor':<16} {'UP' if supervisor_pid else 'DOWN':<9} pid={supervisor_pid or '-':<8} "
               + ("restarts services that exit" if supervisor_pid else "nothing restarts services that exit"))
    for entry in services:
        click.echo(f"{entry.name:<16} {entry.state:<9} pid={entry.pid or '-':<8} "
                   f"restarts={entry.restarts:<3} {entry.detail}")
    click.echo(infra_state.render())
    click.echo(grid.render())
    for line in degraded:
        click.echo(line)
    sys.exit(0 if all_ok else 1)


def _degraded(config: GridConfig, infra_state: Any) -> list[str]:
    """What a component that is down means for the sites (a local cluster names DCs ``cassandra-dc<N>``)."""
    down = {c.name.removeprefix("cassandra-") for c in infra_state.components
            if c.name.startswith("cassandra-") and not c.healthy}
    kafka_down = any(c.name == "kafka" and not c.healthy for c in infra_state.components)
    lines = []
    if kafka_down:
        lines.append("DEGRADED: Kafka is down: every site refuses C-STORE/STOW-RS (0xA701) until it is back")
    for site in config.sites if config.kafka_per_site else []:
        if any(c.name == f"kafka-{site.name}" and not c.healthy for c in infra_state.components):
            lines.append(f"DEGRADED: site {site.name}'s Kafka cluster is down: site {site.name} refuses "
                         f"C-STORE/STOW-RS (0xA701) until it is back; the other sites go on")
    for site in config.sites:
        if site.cassandra_dc in down:
            serving = [s.name for s in config.sites if s.cassandra_dc not in down]
            lines.append(f"DEGRADED: site {site.name}'s Cassandra datacenter {site.cassandra_dc} is down: its "
                         f"queries and index fail; ingest goes on (indexed once it is back)"
                         + (f"; site(s) {', '.join(serving)} serve every study" if serving else ""))
    return lines


# -- individual services (what `up` runs) ---------------------------------------------------------


@main.group()
@pass_ctx
def serve(ctx: Context) -> None:
    """Run one service of one site in the foreground."""
    from dicomgrid.core.production import refusal

    message = refusal(ctx.config)
    if message:
        raise click.ClickException(message)


@serve.command("receiver")
@click.option("--site", required=True)
@click.option("--reuse-port", is_flag=True, help="Share the DICOM port with other receiver processes.")
@pass_ctx
def serve_receiver(ctx: Context, site: str, reuse_port: bool) -> None:
    """The DICOM services of one site: C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET, Storage Commitment."""
    from dicomgrid.consumers import called_ae_titles, dimse_services
    from dicomgrid.core.dimse import SiteAE
    from dicomgrid.core.site import open_site
    from dicomgrid.producers.site import build_ingestor
    from dicomgrid.producers.storage_scp import StorageService

    _serving(ctx, site)
    context = open_site(ctx.config, site, "receiver")
    context.application_activity("receiver", started=True)
    ingestor = build_ingestor(context)
    storage = StorageService(ingestor, ctx.config.site(site).ae_title)
    services = [storage, *dimse_services(context)]
    # SIGTERM (the supervisor's stop) unwinds like Ctrl-C, so queued audit records are delivered.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    # Services with work of their own (Storage Commitment reports) start it, and hand it back on exit.
    running = [s for s in services if hasattr(s, "start")]
    try:
        for service in running:
            service.start()
        SiteAE(ctx.config, site, services, ingestor.audit, called_ae_titles(context)).serve(
            spool_dir=storage.spool_dir, reuse_port=reuse_port)
    finally:
        for service in running:
            service.close()
        context.application_activity("receiver", started=False)
        ingestor.flush()
        context.audit.close()


@serve.command("http")
@click.option("--site", required=True)
@pass_ctx
def serve_http(ctx: Context, site: str) -> None:
    """DICOMweb (STOW-RS, QIDO-RS, WADO-RS) of one site."""
    import uvicorn

    from dicomgrid.core.site import open_site
    from dicomgrid.core.tls import uvicorn_ssl
    from dicomgrid.http import create_http_app, guarded_protocol

    _serving(ctx, site)
    site_config = ctx.config.site(site)
    app = create_http_app(open_site(ctx.config, site, "http"))
    uvicorn.run(app, host=site_config.http_host, port=site_config.http_port, log_config=None, access_log=False,
                http=guarded_protocol(ctx.config.connections), **uvicorn_ssl(ctx.config, site))


def _serving(ctx: Context, site: str) -> None:
    """What every service process does first: its logging, and its metrics into the site's shared
    metrics directory (summed up by the site's ``/metrics``)."""
    from dicomgrid.core import metrics

    _logging(ctx)
    ctx.config.site(site)
    metrics.enable_multiprocess(metrics.metrics_dir(ctx.config.root, ctx.config.name, site))


def _in_background(ctx: Context) -> None:
    """A service that works from Kafka rather than for a waiting sender yields the CPU ([scheduling])."""
    from dicomgrid.core.scheduling import lower_priority

    lower_priority(ctx.config.scheduling.background_nice)


def _run_faust(ctx: Context, create: Callable[[GridConfig, str], Any], site: str) -> None:
    import faust

    from dicomgrid.core.kafka import mirrored_from, wait_until_created

    _serving(ctx, site)
    _in_background(ctx)
    # The site's own Kafka cluster (the shared one unless it names one), its topics and mirrored ones.
    wait_until_created(ctx.config.site_kafka(site), mirrored_from=mirrored_from(ctx.config, site))
    # The grid's logging stays (structured, to the service's rotating log file); faust would replace it.
    worker = faust.Worker(create(ctx.config, site), loglevel=ctx.config.log_level.lower(), quiet=True,
                          override_logging=False)
    worker.execute_from_commandline()


@serve.command("processors")
@click.option("--site", required=True)
@pass_ctx
def serve_processors(ctx: Context, site: str) -> None:
    """Stream processors of one site's worker: the indexer and the replication fan-out."""
    from dicomgrid.processors.app import create_app

    _run_faust(ctx, create_app, site)


@serve.command("replicator")
@click.option("--site", required=True)
@pass_ctx
def serve_replicator(ctx: Context, site: str) -> None:
    """The replication worker of one site: copies the payloads addressed to it from other sites."""
    from dicomgrid.processors.replicator import create_replicator_app

    _run_faust(ctx, create_replicator_app, site)


# -- healing -----------------------------------------------------------------------------------------


def _site_job(ctx: Context, site: str, role: str) -> Any:
    from dicomgrid.core.site import open_site

    _logging(ctx)
    try:
        ctx.config.site(site)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    return open_site(ctx.config, site, role)


@main.command("scrub")
@click.option("--site", required=True, help="The site whose copies are checked.")
@click.option("--rate", "rate_mb_s", type=click.FloatRange(min=0.1), default=None,
              help="MB/s of copies re-hashed (default: healing.scrub_rate_mb_s).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@pass_ctx
def scrub(ctx: Context, site: str, rate_mb_s: float | None, as_json: bool) -> None:
    """Re-hash every copy a site holds and repair missing or corrupt ones from other sites (resumable)."""
    import json as json_module

    from tqdm import tqdm

    from dicomgrid.processors.replicator import site_transfer
    from dicomgrid.processors.scrub import Scrubber, scrub_checkpoint

    context = _site_job(ctx, site, "scrub")
    rate = (rate_mb_s or ctx.config.healing.scrub_rate_mb_s) * 1e6
    total = sum(context.blobs.size(d) for d in context.blobs.digests())
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"scrub {site}", disable=as_json) as bar:
            report = Scrubber(context, site_transfer(context), scrub_checkpoint(ctx.config, site),
                              rate_bytes_s=rate).run(on_progress=bar.update)
    finally:
        context.close()
    click.echo(json_module.dumps(report.as_dict(), indent=2) if as_json else report.render())
    sys.exit(1 if report.unrepaired else 0)


@main.command("recover")
@click.option("--site", required=True, help="The site to rebuild (e.g. after losing its disk).")
@click.option("--rate", "rate_mb_s", type=click.FloatRange(min=0.1), default=None,
              help="MB/s cap on what is fetched (default: replication.bandwidth_mb_s, else none).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@pass_ctx
def recover(ctx: Context, site: str, rate_mb_s: float | None, as_json: bool) -> None:
    """Rebuild every payload a site should hold from the other sites (resumable after Ctrl-C or a crash)."""
    import json as json_module

    from tqdm import tqdm

    from dicomgrid.processors.recovery import Recovery
    from dicomgrid.processors.replicator import site_transfer

    context = _site_job(ctx, site, "recovery")
    checkpoint = ctx.config.root / "run" / "healing" / ctx.config.name / f"recover-{site}.done"
    recovery = Recovery(context, site_transfer(context, rate_mb_s), checkpoint,
                        concurrency=ctx.config.replication.concurrency)
    try:
        plan, already = recovery.plan()
        with tqdm(total=len(plan) + already, initial=already, unit="inst", desc=f"recover {site}",
                  disable=as_json) as bar:
            report = recovery.run(plan, already, on_progress=lambda holding: bar.update())
    finally:
        context.close()
    click.echo(json_module.dumps(report.as_dict(), indent=2) if as_json else report.render())
    sys.exit(0 if report.ok else 1)


@main.command("repair")
@click.option("--site", "sites", multiple=True, help="Only these sites (repeatable; default: every site).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@pass_ctx
def repair(ctx: Context, sites: tuple[str, ...], as_json: bool) -> None:
    """Anti-entropy: request every copy a site should hold by the policy that the ledger does not list."""
    import json as json_module

    from dicomgrid.processors.recovery import sweep

    reports = []
    for name in sites or [s.name for s in ctx.config.sites]:
        context = _site_job(ctx, name, "repair")
        try:
            reports.append(sweep(context, requested_by="dicomgrid repair"))
        finally:
            context.close()
    if as_json:
        click.echo(json_module.dumps([r.as_dict() for r in reports], indent=2))
    else:
        for r in reports:
            click.echo(f"site {r.site}: {r.checked} payload(s) checked, {r.requested} copy request(s) sent, "
                       f"{r.unavailable} with no verified copy anywhere")
    sys.exit(1 if any(r.unavailable for r in reports) else 0)


@main.command("reindex")
@click.option("--dc", default=None, help="The Cassandra datacenter to write through (default: the first site's).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@pass_ctx
def reindex_command(ctx: Context, dc: str | None, as_json: bool) -> None:
    """Rebuild the index and the replica ledger from the retained event log (a lost keyspace)."""
    import json as json_module

    from tqdm import tqdm

    from dicomgrid.processors.reindex import reindex, total_events

    _logging(ctx)
    dc = dc or ctx.config.sites[0].cassandra_dc
    with tqdm(total=total_events(ctx.config, dc), unit="event", desc=f"reindex via {dc}", disable=as_json) as bar:
        report = reindex(ctx.config, dc, on_progress=bar.update)
    click.echo(json_module.dumps(report.as_dict(), indent=2) if as_json else report.render())


# -- audit -------------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The audit trail: DICOM audit messages in a hash chain per site."""


def _audit_log(ctx: Context) -> Any:
    from dicomgrid.core.audit_log import AuditLog
    from dicomgrid.core.cassandra import Cassandra

    _logging(ctx)
    return AuditLog(Cassandra(ctx.config, local_dc=ctx.config.sites[0].cassandra_dc if ctx.config.sites else None))


@audit.command("verify")
@click.option("--site", "sites", multiple=True, help="Only these sites (repeatable; default: every site with records).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def audit_verify(ctx: Context, sites: tuple[str, ...], as_json: bool) -> None:
    """Check every link and signed checkpoint of the audit chain; name what was changed, removed or moved."""
    import json as json_module

    from dicomgrid.core.audit_log import load_signing_key, verify

    store = _audit_log(ctx)
    try:
        public = load_signing_key(ctx.config.audit_signing_key_file).public_key()
        verdicts = [verify(store, site, public) for site in (sites or store.sites())]
    finally:
        store.db.close()
    if as_json:
        click.echo(json_module.dumps([v.as_dict() for v in verdicts], indent=2))
    else:
        for v in verdicts:
            click.echo(f"site {v.site}: {v.records} record(s), {v.checkpoints} signed checkpoint(s): "
                       + ("intact" if v.ok else "TAMPERED"))
            for problem in v.problems:
                click.echo(f"  {problem}")
    sys.exit(0 if all(v.ok for v in verdicts) else 1)


def _when(value: str | None) -> Any:
    import datetime as dt

    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


@audit.command("query")
@click.option("--patient", help="Patient ID.")
@click.option("--study", help="Study Instance UID.")
@click.option("--user", help="User ID or AE title.")
@click.option("--since", help="From this time (ISO 8601, UTC unless given).")
@click.option("--until", help="Up to this time.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line.")
@pass_ctx
def audit_query(ctx: Context, patient: str | None, study: str | None, user: str | None, since: str | None,
                until: str | None, as_json: bool) -> None:
    """Who accessed a patient (or a study, or what a user did) between two times: one record per line."""
    import json as json_module

    given = [(k, v) for k, v in (("patient", patient), ("study", study), ("user", user)) if v]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --patient, --study, --user")
    (kind, value), = given
    store = _audit_log(ctx)
    try:
        for entry in store.query(kind, value, _when(since), _when(until)):
            record = entry.decoded()
            if as_json:
                click.echo(json_module.dumps(record, ensure_ascii=False))
                continue
            who = ", ".join(f"{p['user_id']}" + (f" (AE {p['ae_title']})" if p.get("ae_title") else "")
                            + (f" @ {p['network_address']}" if p.get("network_address") else "")
                            for p in record["participants"] if p["requestor"]) or "-"
            objects = ", ".join(f"{o['type']} {o['id']}" for o in record["objects"] if o["type"] != "instance")
            click.echo(f"{record['occurred_at']}  {record['event']} ({record['action']})  outcome {record['outcome']}"
                       f"  site {record['site']}  by {who}  {objects}")
    finally:
        store.db.close()


@serve.command("sink")
@click.option("--site", required=True)
@pass_ctx
def serve_sink(ctx: Context, site: str) -> None:
    """The Parquet sink: instance metadata and audit records as datasets (consumer group of its own)."""
    from dicomgrid.consumers.parquet_sink import ParquetSink, analytics_root
    from dicomgrid.core.kafka import wait_until_created

    _serving(ctx, site)
    _in_background(ctx)
    wait_until_created(ctx.config.site_kafka(site))
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda signum, frame: stop.update(now=True))
    analytics = ctx.config.analytics
    ParquetSink(ctx.config.for_site(site), analytics_root(ctx.config), flush_rows=analytics.flush_rows,
                flush_s=analytics.flush_s).run(lambda: stop["now"])


# -- export ------------------------------------------------------------------------------------------


@main.group()
def export() -> None:
    """Write what the grid holds to a folder."""


@export.command("study")
@click.argument("study_uid")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--site", default=None, help="The site to export from (default: the first).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@pass_ctx
def export_study_command(ctx: Context, study_uid: str, directory: str, site: str | None, as_json: bool) -> None:
    """One study as DICOM files: DIRECTORY/<study>/<series>/<instance>.dcm (verified; audited as Export)."""
    import json as json_module

    from tqdm import tqdm

    from dicomgrid.consumers.study_export import export_study

    context = _site_job(ctx, site or ctx.config.sites[0].name, "export")
    try:
        with tqdm(unit="inst", desc=f"export {study_uid[:24]}", disable=as_json) as bar:
            report = export_study(context, study_uid, Path(directory), on_progress=bar.update)
    finally:
        context.close()
    click.echo(json_module.dumps(report.as_dict(), indent=2) if as_json else report.render())
    sys.exit(0 if report.ok else 1)


@export.command("parquet")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--since", help="Only instances received from this time (ISO 8601, UTC unless given).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@pass_ctx
def export_parquet(ctx: Context, directory: str, since: str | None, as_json: bool) -> None:
    """The instances dataset of the Parquet sink, written on demand from the index."""
    import json as json_module

    from tqdm import tqdm

    from dicomgrid.consumers.parquet_export import export_instances
    from dicomgrid.core.cassandra import Cassandra
    from dicomgrid.core.index_reader import IndexReader

    _logging(ctx)
    db = Cassandra(ctx.config, local_dc=ctx.config.sites[0].cassandra_dc if ctx.config.sites else None)
    try:
        with tqdm(unit="inst", desc="export", disable=as_json) as bar:
            rows = export_instances(IndexReader(db), Path(directory), _when(since), on_progress=bar.update)
    finally:
        db.close()
    summary = {"directory": str(Path(directory).resolve()), "instances": rows}
    click.echo(json_module.dumps(summary) if as_json else f"{rows} instance(s) written to {summary['directory']}")


# -- secrets and tokens ------------------------------------------------------------------------------


@main.group()
def secrets() -> None:
    """Key material: the development CA and certificates, token signing keys."""


@secrets.command("init")
@pass_ctx
def secrets_init(ctx: Context) -> None:
    """Make the key material the config names and that is missing (idempotent; never overwrites).

    In development that is a local CA, a certificate per site issued by it, the grid's token signing
    key and each site's own token key, all under the data directory's secrets/.
    """
    from dicomgrid.core import pki

    try:
        made = pki.ensure_material(ctx.config)
    except pki.KeyMaterialError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(made.render())
    if pki.needs_tls(ctx.config):
        click.echo(f"CA certificate (give it to storescu +cf, curl --cacert): {ctx.config.tls_ca_file}")


@secrets.command("cert")
@click.argument("ae_title")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder to write <AE>.pem and <AE>-key.pem to.")
@pass_ctx
def secrets_cert(ctx: Context, ae_title: str, out_dir: str) -> None:
    """Issue a client certificate for AE_TITLE from the development CA (e.g. for storescu +tls)."""
    from dicomgrid.core import pki

    if not pki.is_development_certificate(ctx.config.tls_ca_file):
        raise click.ClickException("only the development CA of `dicomgrid secrets init` issues certificates here")
    out = Path(out_dir)
    cert, key = out / f"{ae_title}.pem", out / f"{ae_title}-key.pem"
    if cert.exists() or key.exists():
        raise click.ClickException(f"{cert} or {key} exists already")
    try:
        pki.issue_certificate(ctx.config.tls_ca_file, cert, key, ae_title)
    except pki.KeyMaterialError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{cert}\n{key}")


@main.group()
def token() -> None:
    """Bearer tokens for the sites' HTTP services."""


@token.command("issue")
@click.option("--scope", "scopes", multiple=True, required=True,
              help="read, write, replicate or audit (repeatable, or comma-separated).")
@click.option("--site", default=None, help="Only this site accepts the token (default: every site).")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: seconds, or 15m, 12h, 30d.")
@click.option("--subject", default=None, help="Who the token is for (audit records name it; default: $USER).")
@pass_ctx
def token_issue(ctx: Context, scopes: tuple[str, ...], site: str | None, ttl: str, subject: str | None) -> None:
    """Print a token (JWT) signed with the grid's token signing key."""
    import getpass

    from dicomgrid.core import pki
    from dicomgrid.core.tokens import issue, parse_duration

    wanted = [part.strip() for value in scopes for part in value.split(",") if part.strip()]
    try:
        minted = issue(ctx.config, wanted, subject=subject or getpass.getuser(), ttl_s=parse_duration(ttl),
                       site=site)
    except (ValueError, KeyError, pki.KeyMaterialError) as exc:
        raise click.ClickException(str(exc.args[0]) if exc.args else str(exc)) from exc
    click.echo(minted)


@main.group("config")
def config_group() -> None:
    """The effective configuration."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def config_show(ctx: Context, as_json: bool) -> None:
    """The configuration after defaults, file and environment (secrets shown as **********)."""
    import json as json_module

    dumped = ctx.config.model_dump(mode="json")
    if as_json:
        click.echo(json_module.dumps(dumped, indent=2))
        return
    for section, value in dumped.items():
        if isinstance(value, dict):
            for key, item in value.items():
                click.echo(f"{section}.{key} = {json_module.dumps(item)}")
        elif isinstance(value, list):
            click.echo(f"{section} = {json_module.dumps(value)}")
        else:
            click.echo(f"{section} = {json_module.dumps(value)}")


# -- replication -------------------------------------------------------------------------------------


@main.group()
def replication() -> None:
    """Payload replication between sites."""


@replication.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--window", "window_min", type=click.FloatRange(min=1), default=15.0, show_default=True,
              help="Minutes of recent copies and failures to report on.")
@pass_ctx
def replication_status(ctx: Context, as_json: bool, window_min: float) -> None:
    """Per site: copies pending and failed, under-replicated instances, replication lag p50/p99."""
    from confluent_kafka import KafkaException

    from dicomgrid.core.cassandra import Cassandra
    from dicomgrid.core.ledger import ReplicaLedger
    from dicomgrid.processors.replication_status import replication_status as status_of

    db = Cassandra(ctx.config, local_dc=ctx.config.sites[0].cassandra_dc if ctx.config.sites else None)
    try:
        status = status_of(ctx.config, ReplicaLedger(db), window_s=window_min * 60)
    except KafkaException as exc:
        raise click.ClickException(f"replication status unavailable: {exc}") from exc
    finally:
        db.close()
    click.echo(status.as_json() if as_json else status.render())


# -- import and seeding ------------------------------------------------------------------------------


@main.command("import")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--site", required=True, help="The site to send to.")
@click.option("--calling-ae", default="STORESCU", show_default=True, help="The calling AE title to send as.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
@pass_ctx
def import_folder(ctx: Context, directory: str, site: str, calling_ae: str, as_json: bool) -> None:
    """Push every DICOM file under DIRECTORY to a site over C-STORE, as a PACS would (exit 1 if any failed)."""
    import json as json_module

    from dicomgrid.producers.seed import send_files

    _logging(ctx)
    try:
        site_config = ctx.config.site(site)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
    try:
        report = send_files(site_config, files, calling_ae, progress=not as_json)
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json_module.dumps(report.as_dict(), indent=2) if as_json else report.render(list_skipped=True))
    sys.exit(1 if report.failed else 0)




@main.command("seed")
@click.option("--site", default=None, help="Site to send to (default: the first).")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds to wait for the stored instances to reach min_copies sites (0: do not wait).")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@pass_ctx
def seed(ctx: Context, site: str | None, wait_s: float, paths: tuple[str, ...]) -> None:
    """Push sample studies to a site with C-STORE, as a PACS would (default: pydicom's test files)."""
    from dicomgrid.producers.seed import sample_files, send_files

    _logging(ctx)
    site_config = ctx.config.site(site) if site else ctx.config.sites[0]
    files = [Path(p) for p in paths] if paths else sample_files()
    tls = None
    if not ctx.config.tls.plain_dicom:  # then over the site's TLS port, as a PACS would
        from dicomgrid.core.tls import client_context

        tls = client_context(ctx.config)
    report = send_files(site_config, files, tls=tls)
    click.echo(report.render())
    if wait_s and report.stored:
        _wait_replicated(ctx.config, site_config.cassandra_dc, list(dict.fromkeys(report.stored)), wait_s)
    if report.failed:
        sys.exit(1)


def _wait_replicated(config: GridConfig, dc: str, sop_uids: list[str], timeout: float) -> None:
    """Show the seeded instances reaching ``min_copies`` verified copies (or say which did not)."""
    from tqdm import tqdm

    from dicomgrid.core.cassandra import Cassandra
    from dicomgrid.core.index_reader import IndexReader
    from dicomgrid.core.ledger import ReplicaLedger
    from dicomgrid.processors.replication_status import verified_copies

    db = Cassandra(config, local_dc=dc)
    index, ledger = IndexReader(db), ReplicaLedger(db)
    deadline = time.monotonic() + timeout
    try:
        with tqdm(total=len(sop_uids), unit="inst", desc=f"replicated to {config.min_copies} sites") as bar:
            while True:
                copies = verified_copies(index, ledger, sop_uids)
                safe = sum(1 for sites in copies.values() if len(sites) >= config.min_copies)
                bar.update(safe - bar.n)
                if safe == len(sop_uids) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
    finally:
        db.close()
    by_sites: dict[str, int] = {}
    for sites in copies.values():
        label = ", ".join(sorted(sites)) or "(not indexed yet)"
        by_sites[label] = by_sites.get(label, 0) + 1
    click.echo("verified copies: " + "; ".join(f"{n} instance(s) at {label}" for label, n in sorted(by_sites.items())))
    if safe < len(sop_uids):
        click.echo(f"{len(sop_uids) - safe} instance(s) not yet at {config.min_copies} sites after {timeout:.0f} s; "
                   "see `dicomgrid replication status`")


from dicomgrid.trials.cli import trial  # noqa: E402 - the `trial` group lives with the trials

main.add_command(trial)

if __name__ == "__main__":
    main()
