"""C-GET: how fast a study comes back over one association, grid against Orthanc.

DCMTK ``getscu`` retrieves a reference study (held identically by both archives) at STUDY level and
writes each instance bit-preserved to a memory-backed directory; the files are counted every run.
C-MOVE and WADO-RS are listed as not measured yet.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import asdict

from bench import report
from bench.clients import probe, run_client
from bench.grid import AE_TITLE
from bench.paths import send_dir
from bench.refstudy import ARCHIVES, ReferenceStudy, reference_studies
from bench.sections import Section
from bench.session import Session
from bench.targets import MAX_PDU

MB = 1e6


def _get(session: Session, target_key: str, study: ReferenceStudy) -> tuple[float, int]:
    """(seconds, instances received) of one C-GET of the whole study."""
    target = session.target(target_key)
    directory = send_dir("dicomgrid-bench-get-")
    try:
        run = run_client(["getscu", "-S", "-aet", "GETSCU", "-aec", target.ae_title, "127.0.0.1", str(target.port),
                          "--max-pdu", str(MAX_PDU), "--bit-preserving", "-od", str(directory),
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}"])
        received = sum(1 for _ in directory.iterdir())
        if run.code != 0 or run.errors or received != study.instances:
            raise RuntimeError(f"C-GET from {target.label}: exit {run.code}, {received}/{study.instances} "
                               f"instances; {run.errors[:1]}")
        return run.seconds, received
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class RetrieveScenario:
    key = "retrieve"
    title = "Retrieve (C-GET, C-MOVE, WADO-RS)"
    later = ["C-MOVE to storescp: instances/s", "WADO-RS study retrieve: MB/s"]

    def run(self, session: Session) -> Section:
        reason = probe(["getscu", "-S", "-aet", "GETSCU", "-aec", AE_TITLE, "127.0.0.1",
                        str(session.grid.dicom_port), "-od", str(session.log_dir),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4"])
        if reason:
            return Section.pending(self.key, self.title, ["C-GET study: instances/s, grid vs Orthanc", *self.later],
                                   reason)
        session.target("grid").activate()
        results = []
        for study in reference_studies(session):
            for target_key in ARCHIVES:
                seconds = [_get(session, target_key, study)[0] for _ in range(session.options.repetitions)]
                median = statistics.median(seconds)
                results.append({
                    "corpus": study.corpus, "target": target_key, "instances": study.instances,
                    "bytes": study.bytes, "seconds": seconds,
                    "instances_per_s": round(study.instances / median, 1),
                    "mb_per_s": round(study.bytes / MB / median, 1),
                })
        by = {(r["corpus"], r["target"]): r for r in results}
        rows = [
            [r["corpus"], session.target(r["target"]).label, r["instances"], f"{r['instances_per_s']:.0f}",
             f"{r['mb_per_s']:.1f}",
             "-" if r["target"] == "orthanc"
             else report.ratio(r["instances_per_s"] / by[(r["corpus"], "orthanc")]["instances_per_s"])]
            for r in results
        ]
        markdown = (
            f"`getscu -S` of the whole reference study over one association, instances written bit-preserved to "
            f"memory; median of {session.options.repetitions} repetition(s). The grid runs with 1 receiver process."
            "\n\n" + report.table(["corpus", "target", "instances", "inst/s", "MB/s", "vs Orthanc"], rows)
            + "\n" + report.table(["measurement", "result"], [[row, "not measured yet"] for row in self.later])
            + "\nC-MOVE and WADO-RS exist in the grid; their measurements are still to be written.\n"
        )
        studies = [asdict(s) for s in reference_studies(session)]
        return Section(self.key, self.title, True, markdown, {"reference_studies": studies, "results": results})
