"""Reference studies for the query and retrieve scenarios: the same study stored in Orthanc and the grid.

The first study of each corpus is sent once (fresh UIDs, not measured) to every target that can answer
queries, so both hold identical data and a query matches the same number of instances in each.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.corpus import uid
from bench.session import Session
from bench.storescu import send

# Targets that answer C-FIND and C-GET (storescp only stores).
ARCHIVES = ("orthanc", "grid")


@dataclass(frozen=True)
class ReferenceStudy:
    corpus: str
    study_uid: str
    series_uid: str
    instances: int
    bytes: int


def reference_studies(session: Session) -> list[ReferenceStudy]:
    """One study per corpus, stored in every archive target (done once per session)."""
    if "reference_studies" in session.shared:
        return session.shared["reference_studies"]
    studies = []
    for corpus in session.corpora:
        spec = corpus.spec
        run = corpus.materialize(1, limit=-(-spec.count // spec.studies))
        try:
            for key in ARCHIVES:
                target = session.target(key)
                target.activate()
                target.before_run()
                sent = send(run.parts, target.ae_title, target.port, session.log_dir)
                check = target.after_run(run, sent)
                if not sent.ok or check.stored != run.count:
                    raise RuntimeError(f"reference study not stored in {target.label}: {sent.failures or check}")
            studies.append(ReferenceStudy(spec.name, uid(run.token, 1, 1), uid(run.token, 2, 1), run.count,
                                          run.total_bytes))
        finally:
            run.remove()
    session.shared["reference_studies"] = studies
    return studies
