"""Every benchmark scenario, in the order their sections appear in the results.

A new measurement is a class with ``key``, ``title`` and ``run(session) -> Section`` added to
:data:`SCENARIOS`. A scenario whose grid feature may be missing probes for it first and reports
"not yet available" with the probe's answer (see :meth:`bench.sections.Section.pending`).
"""

from __future__ import annotations

from bench.cfind_scale import CFindScaleScenario
from bench.ingest import IngestScenario
from bench.profiling import ReceiveProfileScenario
from bench.query import QueryScenario
from bench.retrieve import RetrieveScenario
from bench.sections import Scenario, Section
from bench.session import Session


class ReplicationScenario:
    key = "replication"
    title = "Replication lag between sites"

    def run(self, session: Session) -> Section:
        return Section.pending(
            self.key, self.title,
            ["time from the C-STORE response at site A until the payload is stored at site B"],
            "The replication service does not exist yet.",
        )


SCENARIOS: list[Scenario] = [
    IngestScenario(),
    ReceiveProfileScenario(),
    QueryScenario(),
    CFindScaleScenario(),
    RetrieveScenario(),
    ReplicationScenario(),
]
