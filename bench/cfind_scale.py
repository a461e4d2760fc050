"""C-FIND latency at metadata scale: N studies indexed, study-level queries by PatientID and date range.

Studies are generated straight into the index through the indexer (the same upserts the stream
processor makes), so loading 10k studies takes a minute, not a 10k-instance ingest. The queries go
through a real site AE over one association, as a PACS would send them.

    .venv/bin/python -m bench.cfind_scale --studies 10000
"""

from __future__ import annotations

import datetime as dt
import tempfile
import random
import statistics
import time
import uuid
from pathlib import Path

import click
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from tqdm import tqdm

from dicomgrid.core.config import load_config
from dicomgrid.core.kafka import delete_topics, ensure_topics
from dicomgrid.core.metadata import MetadataStore, apply_schema
from dicomgrid.dimse import set_nodelay
from dicomgrid.processors.indexer import Indexer
from dicomgrid.supervisor import Supervisor

KEYSPACE = "dicomgrid_scale"
GRID = "dicomgrid-scale"


def _event(study: str, patient: str, day: dt.date, when: dt.datetime) -> dict:
    digest = uuid.uuid4().hex * 2
    return {
        "event_id": str(uuid.uuid4()), "event_type": "dicom.instance.stored", "schema_version": 1,
        "occurred_at": when.isoformat().replace("+00:00", "Z"), "site": "A",
        "source": {"protocol": "IMPORT", "calling_ae": None, "called_ae": None, "peer_address": None},
        "patient": {"id": patient, "issuer": None, "name": f"Scale^{patient}", "birth_date": "19700101", "sex": "O"},
        "study": {"uid": study, "date": day.strftime("%Y%m%d"), "time": "120000", "accession_number": None,
                  "id": None, "description": "scale", "referring_physician_name": None,
                  "specific_character_set": None},
        "series": {"uid": generate_uid(), "modality": "CT", "number": 1, "description": None,
                   "body_part_examined": None, "date": None, "time": None},
        "instance": {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "sop_instance_uid": generate_uid(),
                     "transfer_syntax_uid": "1.2.840.10008.1.2.1", "number": 1, "rows": None, "columns": None,
                     "number_of_frames": None},
        "payload": {"uri": f"blob://A/sha256/{digest}", "site": "A", "sha256": digest, "size": 1},
        "version": 1, "replaces": None,
    }


def load(store: MetadataStore, studies: int, patients: int, seed: int) -> None:
    rng = random.Random(seed)
    now = dt.datetime.now(dt.timezone.utc)
    indexer = Indexer(store)
    batch = []
    for i in tqdm(range(studies), unit="study", desc="indexing"):
        day = dt.date(2015, 1, 1) + dt.timedelta(days=rng.randrange(3650))
        batch.append(_event(generate_uid(), f"SCALE{rng.randrange(patients):06d}", day, now))
        if len(batch) == 500 or i == studies - 1:
            indexer.apply(batch)
            batch = []


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(host: str, port: int, ae_title: str, queries: list[Dataset]) -> list[float]:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    # Like DCMTK with TCP_NODELAY=1: without it every response waits on a delayed ACK.
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established, "association with the grid failed"
    latencies = []
    try:
        for query in queries:
            started = time.perf_counter()
            statuses = [status.Status for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
            latencies.append((time.perf_counter() - started) * 1000)
            assert statuses and statuses[-1] == 0x0000, f"C-FIND failed: {statuses[-1:]}"
    finally:
        assoc.release()
    return latencies


def study_query(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "ModalitiesInStudy",
                    "NumberOfStudyRelatedInstances"):
        setattr(ds, keyword, "")
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


@click.command()
@click.option("--studies", default=10_000, show_default=True)
@click.option("--patients", default=2_000, show_default=True)
@click.option("--queries", default=200, show_default=True)
@click.option("--reload", is_flag=True, help="Index the studies again even if the keyspace has them.")
def main(studies: int, patients: int, queries: int, reload: bool) -> None:
    base = load_config()
    config = base.model_copy(update={
        "name": GRID,
        "cassandra": base.cassandra.model_copy(update={"keyspace": KEYSPACE}),
        "sites": [base.sites[0].model_copy(update={"dicom_port": 21912, "http_port": 28912,
                                                    "storage_root": base.root / "bench" / "scale" / "A"})],
    })
    apply_schema(config)
    store = MetadataStore(config, local_dc=config.sites[0].cassandra_dc)
    present = store.execute("SELECT count(*) FROM studies", timeout=120).one()[0]
    if reload or present < studies:
        load(store, studies - (0 if reload else present), patients, seed=present)
    total = store.execute("SELECT count(*) FROM studies", timeout=120).one()[0]
    store.close()

    config_file = Path(tempfile.mkdtemp()) / "scale.toml"
    site = config.sites[0]
    config_file.write_text(
        f'name = "{GRID}"\ndata_dir = "{config.root}"\n[cassandra]\nkeyspace = "{KEYSPACE}"\n'
        f'[kafka]\ntopic_prefix = "{GRID}."\n'
        f'[[sites]]\nname = "A"\nae_title = "{site.ae_title}"\ndicom_port = {site.dicom_port}\n'
        f'http_port = {site.http_port}\nstorage_root = "{site.storage_root}"\ncassandra_dc = "dc1"\n'
    )
    scale_config = load_config(config_file)
    # The scale grid's own (empty) topics: it answers from what was loaded above, not from a topic.
    ensure_topics(scale_config.kafka)
    supervisor = Supervisor(scale_config, str(config_file))
    supervisor.up(timeout=90)
    try:
        rng = random.Random(7)
        by_patient = [study_query(PatientID=f"SCALE{rng.randrange(patients):06d}") for _ in range(queries)]
        by_range = []
        for _ in range(queries // 4):
            start = dt.date(2015, 1, 1) + dt.timedelta(days=rng.randrange(3600))
            end = start + dt.timedelta(days=7)
            by_range.append(study_query(StudyDate=f"{start:%Y%m%d}-{end:%Y%m%d}"))
        measure(site.dicom_host, site.dicom_port, site.ae_title, by_patient[:10])  # warm-up
        results = {
            "by PatientID": measure(site.dicom_host, site.dicom_port, site.ae_title, by_patient),
            "by StudyDate range (7 days)": measure(site.dicom_host, site.dicom_port, site.ae_title, by_range),
        }
    finally:
        supervisor.down()
        delete_topics(scale_config.kafka)
    click.echo(f"\nC-FIND study level, {total} studies indexed, one association, site A")
    click.echo("| query | n | p50 ms | p99 ms | mean ms |\n|---|---|---|---|---|")
    for name, values in results.items():
        click.echo(f"| {name} | {len(values)} | {percentile(values, 0.5):.1f} | {percentile(values, 0.99):.1f} "
                   f"| {statistics.mean(values):.1f} |")


if __name__ == "__main__":
    main()
