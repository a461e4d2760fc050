"""Reference studies for the query and retrieve scenarios: the same study stored in Orthanc and the grid.

The first study of a corpus is sent once per session (fresh UIDs, not measured) to every target that can
answer queries and retrieves, with the same DCMTK storescu, so both hold identical data: a query matches
the same number of instances in each and a retrieve moves the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.corpus import Corpus, uid
from bench.session import Session
from bench.storescu import send

# Targets that answer C-FIND, C-GET and WADO-RS (storescp only stores).
ARCHIVES = ("orthanc", "grid")


@dataclass(frozen=True)
class ReferenceStudy:
    corpus: str
    study_uid: str
    series_uid: str
    instances: int
    bytes: int


def reference_study(session: Session, corpus: Corpus) -> ReferenceStudy:
    """The first study of ``corpus``, stored in every archive target (done once per session and corpus)."""
    studies: dict[str, ReferenceStudy] = session.shared.setdefault("reference_studies", {})
    spec = corpus.spec
    if spec.name in studies:
        return studies[spec.name]
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
        studies[spec.name] = ReferenceStudy(spec.name, uid(run.token, 1, 1), uid(run.token, 2, 1), run.count,
                                            run.total_bytes)
    finally:
        run.remove()
    return studies[spec.name]
