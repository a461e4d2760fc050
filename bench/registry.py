"""Every benchmark scenario, in the order their sections appear in the results.

A new measurement is a class with ``key``, ``title`` and ``run(session) -> Section`` added to
:data:`SCENARIOS`. A scenario whose grid feature may be missing probes for it first and reports
"not yet available" with the probe's answer (see :meth:`bench.sections.Section.pending`).
"""

from __future__ import annotations

from bench.backlog import BacklogScenario
from bench.cfind_scale import CFindScaleScenario
from bench.healing import HealingScenario
from bench.ingest import IngestScenario
from bench.profiling import ReceiveProfileScenario
from bench.query import QueryScenario
from bench.replication import ReplicationScenario
from bench.retrieve import RetrieveScenario
from bench.sections import Scenario

SCENARIOS: list[Scenario] = [
    IngestScenario(),
    ReceiveProfileScenario(),
    QueryScenario(),
    CFindScaleScenario(),
    RetrieveScenario(),
    ReplicationScenario(),
    BacklogScenario(),
    HealingScenario(),  # last: it leaves site B holding only what it recovered
]
