"""C-FIND latency at metadata scale, grid against Orthanc: N studies indexed, study-level queries.

For each N of ``--scale`` (default 10k and 100k) both archives hold the same seeded set of N
one-instance studies (:mod:`bench.scale_set`), loaded directly rather than ingested and cached between
runs (:mod:`bench.scale_archives`). The same seeded query list, by PatientID and by a 7-day StudyDate
range, goes to each archive over one association (pynetdicom, TCP_NODELAY), after a few unmeasured
queries; every query is timed and its matches counted, and the counts must agree between the archives.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import click

from bench import report
from bench.dimse_clients import FindAnswer, FindClient
from bench.scale_archives import LoadReport, archives, report_dict
from bench.scale_set import QUERY_KINDS, ScaleQuery, ScaleSet, queries
from bench.sections import Section
from bench.session import Session
from bench.stats import summary

WARMUP_QUERIES = 10
GOAL_STUDIES = 100_000  # the goal: grid C-FIND p50 at this scale <= Orthanc's, per query kind
RANGE_SHARE = 4  # a fourth as many range queries as PatientID ones: they match many more studies


def _ask(archive: Any, query_list: list[ScaleQuery]) -> list[FindAnswer]:
    with FindClient("127.0.0.1", archive.port, archive.ae_title) as client:
        for query in query_list[:WARMUP_QUERIES]:
            client.find(query.dataset())
        return [client.find(query.dataset()) for query in query_list]


def measure_scale(session: Session, scale: ScaleSet) -> dict[str, Any]:
    """Load (or reuse) both archives at one scale, ask both the same queries, compare the matches."""
    per_kind = {"patient": session.options.queries, "range": max(1, session.options.queries // RANGE_SHARE)}
    query_list = queries(scale, per_kind)
    answers: dict[str, list[FindAnswer]] = {}
    loads: list[LoadReport] = []
    described: dict[str, object] = {}
    for archive in archives(scale):
        with ExitStack() as stack:
            stack.callback(archive.stop)
            loads.append(archive.start())
            described[archive.key] = archive.describe()
            answers[archive.key] = _ask(archive, query_list)
    grid, orthanc = answers["grid"], answers["orthanc"]
    mismatches = [
        {"query": q.keys, "grid": g.matches, "orthanc": o.matches}
        for q, g, o in zip(query_list, grid, orthanc) if g.matches != o.matches
    ]
    kinds = []
    for kind, title in QUERY_KINDS.items():
        idx = [i for i, q in enumerate(query_list) if q.kind == kind]
        row: dict[str, Any] = {"kind": kind, "title": title, "queries": len(idx),
                               "mean_matches": round(sum(orthanc[i].matches for i in idx) / len(idx), 1)}
        for key, got in answers.items():
            row[key] = summary([got[i].ms for i in idx])
        row["p50_ratio"] = round(row["grid"]["p50"] / row["orthanc"]["p50"], 2)
        row["p99_ratio"] = round(row["grid"]["p99"] / row["orthanc"]["p99"], 2)
        kinds.append(row)
    return {"studies": scale.studies, "seed": scale.seed, "patients": scale.patients, "kinds": kinds,
            "mismatches": mismatches, "loads": [report_dict(load) for load in loads], "archives": described}


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    at_goal = next((r for r in results if r["studies"] == GOAL_STUDIES), None)
    out = []
    for kind, title in QUERY_KINDS.items():
        row = next((k for k in at_goal["kinds"] if k["kind"] == kind), None) if at_goal else None
        out.append({"goal": f"C-FIND p50 at {GOAL_STUDIES // 1000}k studies <= Orthanc's, {title}",
                    "measured": row["p50_ratio"] if row else None,
                    "met": None if row is None else row["p50_ratio"] <= 1.0})
    return out


def _load_cell(load: dict[str, Any]) -> str:
    last = load["last_complete_load"]
    full = f"{last['studies']} in {last['seconds']:.0f} s ({last['studies_per_s']:.0f}/s)" if last else "-"
    this = "cached" if load["cached"] else f"{load['loaded']} in {load['seconds']:.0f} s"
    return f"{this}; last complete load: {full}"


def _render(session: Session, results: list[dict[str, Any]], goal_rows: list[dict[str, Any]]) -> str:
    rows, load_rows, alarms = [], [], []
    for r in results:
        for k in r["kinds"]:
            g, o = k["grid"], k["orthanc"]
            rows.append([f"{r['studies']:,}", k["title"], k["queries"], k["mean_matches"],
                         report.number(g["p50"]), report.number(g["p99"]), report.number(o["p50"]),
                         report.number(o["p99"]), report.ratio(k["p50_ratio"]), report.ratio(k["p99_ratio"])])
        for load in r["loads"]:
            load_rows.append([f"{r['studies']:,}", load["archive"], f"{load['studies']:,}", _load_cell(load)])
        if r["mismatches"]:
            shown = "; ".join(f"{m['query']}: grid {m['grid']}, Orthanc {m['orthanc']}" for m in r["mismatches"][:5])
            alarms.append(f"**MISMATCH at {r['studies']:,} studies: {len(r['mismatches'])} queries got different "
                          f"numbers of matches** ({shown})")
    agreement = "\n".join(alarms) if alarms else "Every query got the same number of matches from both archives."
    goal_table = report.table(
        ["goal", "grid/Orthanc p50", "met"],
        [[g["goal"], "not measured in this run" if g["met"] is None else report.ratio(g["measured"]),
          "-" if g["met"] is None else "yes" if g["met"] else "**no**"] for g in goal_rows])
    return (
        "Both archives hold the same seeded set of N one-instance studies (one patient per "
        "~5 studies, StudyDates over 10 years), loaded directly: the grid's keyspace through its indexer, "
        "Orthanc (SQLite index) by REST. The same queries go to each over one association (pynetdicom, "
        f"TCP_NODELAY), after {WARMUP_QUERIES} unmeasured ones; latency is request to final response, "
        "in ms. The grid answers from one receiver process (no stream processors running).\n\n"
        + report.table(["studies", "query (STUDY level)", "queries", "mean matches", "grid p50", "grid p99",
                        "Orthanc p50", "Orthanc p99", "grid/Orthanc p50", "grid/Orthanc p99"], rows)
        + f"\n{agreement}\n\n### Goal\n\n{goal_table}\n"
        "### Loading the sets\n\n"
        + report.table(["studies", "archive", "held", "loaded by this run; last complete load"], load_rows)
    )


class CFindScaleScenario:
    key = "cfind-scale"
    title = "C-FIND at metadata scale (grid vs Orthanc)"

    def run(self, session: Session) -> Section:
        results = []
        for studies in session.options.scales:
            click.echo(f"-- {studies} studies")
            results.append(measure_scale(session, ScaleSet(studies)))
            for mismatch in results[-1]["mismatches"]:
                click.secho(f"C-FIND MISMATCH at {studies} studies: {mismatch}", fg="red", err=True)
        goal_rows = goals(results)
        summary_lines = [
            f"{r['studies']:,} studies, {k['title']}: grid p50 {k['grid']['p50']:.1f} ms / p99 {k['grid']['p99']:.1f} ms, "
            f"Orthanc p50 {k['orthanc']['p50']:.1f} / p99 {k['orthanc']['p99']:.1f} ms "
            f"(p50 {report.ratio(k['p50_ratio'])})" + (f"; {len(r['mismatches'])} MISMATCHES" if r["mismatches"] else "")
            for r in results for k in r["kinds"]
        ]
        return Section(self.key, self.title, True, _render(session, results, goal_rows),
                       {"results": results, "goals": goal_rows}, summary=summary_lines)
