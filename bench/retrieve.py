"""Retrieve: how fast a 200-instance study comes back, grid against Orthanc, by C-GET and by WADO-RS.

The study (small CT instances, :attr:`bench.session.Options.retrieve_study`) is sent once to both archives
with the same storescu (:mod:`bench.refstudy`), so both hold the same bytes. Then
:data:`RETRIEVES_PER_REPETITION` retrieves per repetition, each in turn for each archive:

* **C-GET**: DCMTK ``getscu`` retrieves the study at STUDY level over one association and writes each
  instance bit-preserved to a memory-backed directory; the files are counted every run.
* **WADO-RS**: ``GET {DICOMweb root}/studies/{uid}`` with ``Accept: multipart/related;
  type="application/dicom"`` over a kept-alive HTTP connection (the grid's site HTTP service, Orthanc's
  DICOMweb plugin); the body is streamed and its bytes and parts counted (:mod:`bench.wado`).

One unmeasured retrieve per method and archive comes first (connections, caches). C-MOVE is listed as
not measured yet.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import tenacity

from bench import report, wado
from bench.clients import probe, run_client
from bench.grid import AE_TITLE
from bench.paths import send_dir
from bench.refstudy import ARCHIVES, ReferenceStudy, reference_study
from bench.sections import Section
from bench.session import Session
from bench.targets import MAX_PDU, Orthanc
from dicomgrid.core.tokens import issue

MB = 1e6
GRID_DICOMWEB = "/dicomweb"
# A retrieve of the study takes 30-250 ms, and identical ones vary by 2x on this machine: a median of
# three said more about the host than about the archives.
RETRIEVES_PER_REPETITION = 5


@dataclass(frozen=True)
class Retrieval:
    """One timed retrieve of the whole study."""

    seconds: float
    instances: int
    bytes: int  # bytes received: the files for C-GET, the multipart body for WADO-RS


def _cget(session: Session, target_key: str, study: ReferenceStudy) -> Retrieval:
    target = session.target(target_key)
    directory = send_dir("dicomgrid-bench-get-")
    try:
        run = run_client(["getscu", "-S", "-aet", "GETSCU", "-aec", target.ae_title, "127.0.0.1", str(target.port),
                          "--max-pdu", str(MAX_PDU), "--bit-preserving", "-od", str(directory),
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}"])
        files = list(directory.iterdir())
        if run.code != 0 or run.errors or len(files) != study.instances:
            raise RuntimeError(f"C-GET from {target.label}: exit {run.code}, {len(files)}/{study.instances} "
                               f"instances; {run.errors[:1]}")
        return Retrieval(run.seconds, len(files), sum(f.stat().st_size for f in files))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def dicomweb_root(session: Session, target_key: str) -> str:
    """Where an archive answers DICOMweb: the grid site's HTTP service, or Orthanc's plugin."""
    target = session.target(target_key)
    if isinstance(target, Orthanc):
        return target.dicomweb_url
    return f"http://127.0.0.1:{session.grid.http_port}{GRID_DICOMWEB}"


class _WadoRS:
    """WADO-RS of the study, one HTTP client (keep-alive) per archive for the whole section."""

    def __init__(self) -> None:
        self.clients = {key: wado.client() for key in ARCHIVES}

    def __call__(self, session: Session, target_key: str, study: ReferenceStudy) -> Retrieval:
        url = f"{dicomweb_root(session, target_key)}/studies/{study.study_uid}"
        http = self.clients[target_key]
        if not isinstance(session.target(target_key), Orthanc) and "authorization" not in http.headers:
            token = issue(session.grid.config(), ["read"], subject="bench", ttl_s=12 * 3600)
            http.headers["Authorization"] = f"Bearer {token}"
        result = wado.retrieve(http, url)
        if result.status != 200 or result.parts != study.instances:
            raise RuntimeError(f"WADO-RS from {session.target(target_key).label}: HTTP {result.status}, "
                               f"{result.parts}/{study.instances} instances")
        return Retrieval(result.seconds, result.parts, result.bytes)

    def close(self) -> None:
        for http in self.clients.values():
            http.close()


@dataclass(frozen=True)
class Method:
    key: str
    title: str
    how: str


METHODS = [
    Method("c-get", "C-GET", "`getscu -S` at STUDY level over one association, instances written "
           "bit-preserved to memory"),
    Method("wado-rs", "WADO-RS", "`GET .../studies/{uid}`, `Accept: multipart/related; type=\"application/dicom\"`, "
           "body streamed and counted, one kept-alive connection"),
]


@tenacity.retry(retry=tenacity.retry_if_exception_type(RuntimeError), stop=tenacity.stop_after_delay(60),
                wait=tenacity.wait_fixed(2), reraise=True,
                before_sleep=lambda state: print(f"retrieve warm-up retried: {state.outcome.exception()}", flush=True))
def _warm_up(retriever: Callable[[Session, str, ReferenceStudy], Retrieval], session: Session, target_key: str,
             study: ReferenceStudy) -> None:
    """One unmeasured retrieval. A refusal the archive says is passing (a 503 while an index connection
    comes back after the scale sets' load, say) is tried again for a minute; the measured runs are not."""
    retriever(session, target_key, study)


def retrieves(session: Session) -> int:
    """Measured retrieves per method and archive."""
    return session.options.repetitions * RETRIEVES_PER_REPETITION


def _measure(session: Session, study: ReferenceStudy,
             retrievers: dict[str, Callable[[Session, str, ReferenceStudy], Retrieval]]) -> list[dict[str, Any]]:
    """Every method against every archive, one warm-up each, repetitions interleaving the archives."""
    runs: dict[tuple[str, str], list[Retrieval]] = {}
    for method in METHODS:
        for target_key in ARCHIVES:
            _warm_up(retrievers[method.key], session, target_key, study)
    for repetition in range(retrieves(session)):
        for method in METHODS:
            order = ARCHIVES if repetition % 2 == 0 else ARCHIVES[::-1]
            for target_key in order:
                runs.setdefault((method.key, target_key), []).append(
                    retrievers[method.key](session, target_key, study))
    results = []
    for (method_key, target_key), mine in runs.items():
        seconds = [r.seconds for r in mine]
        median = statistics.median(seconds)
        received = statistics.median(r.bytes for r in mine)
        results.append({
            "method": method_key, "target": target_key, "instances": study.instances,
            "bytes_received": int(received), "seconds": [round(s, 4) for s in seconds],
            "median_s": round(median, 4),
            "spread": round((max(seconds) - min(seconds)) / median, 3),
            "instances_per_s": round(study.instances / median, 1),
            "mb_per_s": round(received / MB / median, 1),
        })
    for r in results:
        orthanc = next(o for o in results if o["method"] == r["method"] and o["target"] == "orthanc")
        r["vs_orthanc"] = None if r["target"] == "orthanc" else round(r["instances_per_s"] / orthanc["instances_per_s"], 2)
    return results


class RetrieveScenario:
    key = "retrieve"
    title = "Retrieve (C-GET, WADO-RS, C-MOVE)"
    rows = ["C-GET of a 200-instance study: instances/s, grid vs Orthanc",
            "WADO-RS of the same study: instances/s, MB/s, grid vs Orthanc"]
    later = ["C-MOVE to storescp: instances/s"]

    def run(self, session: Session) -> Section:
        reason = probe(["getscu", "-S", "-aet", "GETSCU", "-aec", AE_TITLE, "127.0.0.1",
                        str(session.grid.dicom_port), "-od", str(session.log_dir),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4"])
        if reason:
            return Section.pending(self.key, self.title, [*self.rows, *self.later], reason)
        session.target("grid").activate()
        study = reference_study(session, session.corpus(session.options.retrieve_study))
        wado_rs = _WadoRS()
        try:
            results = _measure(session, study, {"c-get": _cget, "wado-rs": wado_rs})
        finally:
            wado_rs.close()
        titles = {m.key: m.title for m in METHODS}
        rows = [
            [titles[r["method"]], session.target(r["target"]).label, r["instances"], f"{r['median_s']:.3f}",
             f"{100 * r['spread']:.0f}%", f"{r['instances_per_s']:.0f}", f"{r['mb_per_s']:.1f}",
             report.ratio(r["vs_orthanc"])]
            for r in results
        ]
        methods = "".join(f"- **{m.title}**: {m.how}.\n" for m in METHODS)
        markdown = (
            f"One study of {study.instances} CT instances ({study.bytes / study.instances / 1e3:.0f} KB each, "
            f"{study.bytes / MB:.1f} MB), stored identically in both archives by storescu; median of "
            f"{retrieves(session)} retrieves per method and archive, alternating between the archives, after one "
            "unmeasured retrieve each (*spread*: (max - min) / median of the times). "
            "The grid runs with 1 receiver process and its site HTTP service; Orthanc answers WADO-RS through "
            "Debian's DICOMweb plugin. *MB/s* counts the bytes received (files for C-GET, the multipart body "
            "for WADO-RS); *grid/Orthanc* is the ratio of instances/s.\n\n"
            f"{methods}\n"
            + report.table(["method", "target", "instances", "median s", "spread", "inst/s", "MB/s", "grid/Orthanc"],
                           rows)
            + "\n" + report.table(["measurement", "result"], [[row, "not measured yet"] for row in self.later])
        )
        summary = [f"{titles[r['method']]} {r['instances']} instances: grid {r['instances_per_s']:.0f} inst/s, "
                   f"{report.ratio(r['vs_orthanc'])} Orthanc" for r in results if r["target"] == "grid"]
        return Section(self.key, self.title, True, markdown, {"study": asdict(study), "results": results},
                       summary=summary)
