"""The one client every target is measured with: DCMTK ``storescu``, one process per association.

Each association is its own ``storescu`` process sending its share of the corpus; the run's time runs
from starting the first process to the exit of the last. ``TCP_NODELAY=1`` is set because DCMTK keeps
Nagle's algorithm on otherwise, and every C-STORE round trip would wait on a delayed ACK.

storescu logs each C-STORE response with a millisecond wall-clock timestamp (a log4cplus config), which
gives both the count of successful stores and the moment of the last response (where index lag starts).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from dicomgrid.deploy.local.dcmtk import require_dcmtk_tool

CALLING_AE = "STORESCU"
# -R: propose only the presentation contexts the files need, as a PACS sending one study does.
OPTIONS = ["-R"]
_LOG_CONFIG = """\
log4cplus.rootLogger = WARN, console
log4cplus.logger.dcmtk.apps.storescu = INFO
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.logToStderr = true
log4cplus.appender.console.ImmediateFlush = true
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%q} %5p: %m%n
"""
_RESPONSE = re.compile(r"^(\d+\.\d+)\s+INFO: Received Store Response \((.*)\)")
_ERROR = re.compile(r"^\d+\.\d+\s+(ERROR|FATAL): (.*)")


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass(frozen=True)
class SendResult:
    seconds: float
    last_response: float  # time.time() of the last C-STORE response of any association
    failures: list[str]  # one line per association that did not store all of its files
    # Per association, time.time() of each successful C-STORE response, in sending order (storescu sends
    # its files in the order given, one at a time), so ``responses[k][i]`` answered ``parts[k][i]``.
    responses: list[list[float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _read_log(log: Path) -> tuple[list[tuple[float, str]], list[str]]:
    responses, errors = [], []
    for line in log.read_text(errors="replace").splitlines():
        if match := _RESPONSE.match(line):
            responses.append((float(match.group(1)), match.group(2)))
        elif match := _ERROR.match(line):
            errors.append(match.group(2))
    return responses, errors


def send(parts: list[list[Path]], called_ae: str, port: int, log_dir: Path, host: str = "127.0.0.1") -> SendResult:
    """Send every part over its own association, all at once; wait for all of them."""
    log_dir.mkdir(parents=True, exist_ok=True)
    config = log_dir / "storescu-logger.cfg"
    config.write_text(_LOG_CONFIG)
    env = dcmtk_env()
    storescu = require_dcmtk_tool("storescu")
    logs = [log_dir / f"storescu-{k}.log" for k in range(len(parts))]
    procs = []
    started = time.monotonic()
    for files, log in zip(parts, logs):
        with log.open("wb") as out:
            argv = [storescu, *OPTIONS, "-lc", str(config), "-aet", CALLING_AE, "-aec", called_ae, host, str(port),
                    *map(str, files)]
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env))
    codes = [proc.wait() for proc in procs]
    seconds = time.monotonic() - started
    failures, last, answered = [], 0.0, []
    for k, (files, code, log) in enumerate(zip(parts, codes, logs)):
        responses, errors = _read_log(log)
        stored = sum(1 for _, status in responses if status == "Success")
        last = max([last, *(at for at, _ in responses)])
        answered.append([at for at, status in responses if status == "Success"])
        if code != 0 or errors or stored != len(files):
            detail = errors[0] if errors else next((s for _, s in responses if s != "Success"), "no error logged")
            failures.append(f"association {k}: exit {code}, {stored}/{len(files)} stored; {detail}")
    return SendResult(seconds, last, failures, answered)
