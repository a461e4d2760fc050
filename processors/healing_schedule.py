"""When a site's background healing runs: a scrub pass and an anti-entropy sweep, each once per period.

The replication worker checks the schedule every minute and runs what is due in a thread of its own,
one job at a time. A job's last completion is kept in a small state file, so a restarted worker does
not start a pass it finished an hour ago; a fresh site counts its first start as a completion (what
arrived was verified on arrival), so the first scrub comes one period later. A scrub stopped part-way
(the worker stopped) is due at once and resumes from its checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class Schedule:
    def __init__(self, state: Path, period_s: float, *, now: float | None = None) -> None:
        self.state = state
        self.period_s = period_s
        if self.last_done() is None:
            self.done(now)

    def last_done(self) -> float | None:
        try:
            return float(json.loads(self.state.read_text())["done_at"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def due(self, *, interrupted: bool = False, now: float | None = None) -> bool:
        last = self.last_done()
        now = time.time() if now is None else now
        return interrupted or last is None or now - last >= self.period_s

    def done(self, now: float | None = None) -> None:
        self.state.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"done_at": time.time() if now is None else now}))
        tmp.replace(self.state)
