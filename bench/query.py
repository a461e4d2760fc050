"""C-FIND: how many queries per second one association gets answered, grid against Orthanc.

DCMTK ``findscu`` repeats one Study Root query over a single association (``--repeat``), so the time is
the archive's answer time plus one association set-up. The queries target a reference study that both
archives hold identically; the number of responses is checked once per query and target.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench import report
from bench.clients import probe, run_client
from bench.grid import AE_TITLE
from bench.paths import send_dir
from bench.refstudy import ARCHIVES, ReferenceStudy, reference_study
from bench.sections import Section
from bench.session import Session


@dataclass(frozen=True)
class FindQuery:
    key: str
    title: str
    level: str
    keys: Callable[[ReferenceStudy], list[str]]
    expected: Callable[[ReferenceStudy], int]
    share: int  # divides Options.queries: queries with many matches are repeated less


QUERIES = [
    FindQuery(
        "study", "STUDY level by StudyInstanceUID (1 match)", "STUDY",
        lambda s: [f"StudyInstanceUID={s.study_uid}", "PatientName", "PatientID", "StudyDate", "StudyDescription",
                   "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"],
        lambda s: 1, 1,
    ),
    FindQuery(
        "instances", "IMAGE level, every instance of a series", "IMAGE",
        lambda s: [f"StudyInstanceUID={s.study_uid}", f"SeriesInstanceUID={s.series_uid}", "SOPInstanceUID",
                   "InstanceNumber"],
        lambda s: s.instances, 10,
    ),
]


def findscu(session: Session, target_key: str, query: FindQuery, study: ReferenceStudy, extra: list[str]) -> list[str]:
    target = session.target(target_key)
    keys = [arg for key in [f"QueryRetrieveLevel={query.level}", *query.keys(study)] for arg in ("-k", key)]
    return ["findscu", "-S", "-aet", "FINDSCU", "-aec", target.ae_title, "127.0.0.1", str(target.port), *extra, *keys]


def _responses(session: Session, target_key: str, query: FindQuery, study: ReferenceStudy) -> int:
    """How many matches one query returns (each is extracted to a file)."""
    directory = send_dir("dicomgrid-bench-find-")
    try:
        run = run_client(findscu(session, target_key, query, study, ["-X", "-od", str(directory)]))
        return -1 if run.code != 0 or run.errors else sum(1 for _ in directory.iterdir())
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class QueryScenario:
    key = "query"
    title = "Query (C-FIND)"
    rows = ["C-FIND over one association: queries/s, grid vs Orthanc"]

    def run(self, session: Session) -> Section:
        reason = probe(["findscu", "-S", "-aet", "FINDSCU", "-aec", AE_TITLE, "127.0.0.1",
                        str(session.grid.dicom_port), "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"])
        if reason:
            return Section.pending(self.key, self.title, self.rows, reason)
        session.target("grid").activate()
        study = reference_study(session, session.corpora[0])
        results = []
        for query in QUERIES:
            repeat = max(1, session.options.queries // query.share)
            for target_key in ARCHIVES:
                got, want = _responses(session, target_key, query, study), query.expected(study)
                seconds = []
                for repetition in range(session.options.repetitions):
                    run = run_client(findscu(session, target_key, query, study, ["--repeat", str(repeat)]))
                    if run.code != 0 or run.errors:
                        raise RuntimeError(f"findscu against {target_key} failed: {run.errors or run.code}")
                    seconds.append(run.seconds)
                median = statistics.median(seconds)
                results.append({
                    "query": query.key, "title": query.title, "target": target_key, "queries": repeat,
                    "seconds": seconds, "queries_per_s": round(repeat / median, 1),
                    "ms_per_query": round(1000 * median / repeat, 2), "matches": got, "expected": want,
                })
        by = {(r["query"], r["target"]): r for r in results}
        rows = []
        for r in results:
            orthanc = by[(r["query"], "orthanc")]["queries_per_s"]
            label = session.target(r["target"]).label
            rows.append([r["title"], label, f"{r['queries_per_s']:.0f}", f"{r['ms_per_query']:.1f}",
                         f"{r['matches']}" + ("" if r["matches"] == r["expected"] else f" (expected {r['expected']})"),
                         report.ratio(r["queries_per_s"] / orthanc) if r["target"] != "orthanc" else "-"])
        markdown = (
            f"`findscu -S --repeat N` over one association against the reference study ({study.instances} "
            f"instances of the {study.corpus} corpus, in both archives); median of {session.options.repetitions} "
            "repetition(s). The grid runs with 1 receiver process.\n\n"
            + report.table(["query", "target", "queries/s", "ms per query", "matches", "vs Orthanc"], rows)
        )
        return Section(self.key, self.title, True, markdown, {"reference_study": asdict(study), "results": results})
