"""Structured logging for every grid process: one JSON object per line (or key=value on a terminal)."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import warnings
from pathlib import Path

import structlog

from dicomgrid.core.redact import redact_phi as _redact_phi

DEFAULT_MAX_BYTES = 20 * 1024**2
DEFAULT_BACKUPS = 5


def rotating_handler(path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                     delay: bool = False) -> logging.handlers.RotatingFileHandler:
    """A handler that appends to ``path`` and, past ``max_bytes``, renames it ``path.1`` (older ones
    shift up to ``path.<backups>``, the oldest is dropped): a restart never loses what came before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                encoding="utf-8", delay=delay)


def rotate_if_large(path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
    """Rotate ``path`` like :func:`rotating_handler` would, if it has reached ``max_bytes``; for files a
    process writes without the logging module (its console output), before it starts appending."""
    try:
        if path.stat().st_size < max_bytes:
            return
    except FileNotFoundError:
        return
    handler = rotating_handler(path, max_bytes, backups, delay=True)
    handler.doRollover()
    handler.close()


def configure_logging(
    level: str = "INFO",
    *,
    json: bool | None = None,
    log_file: Path | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backups: int = DEFAULT_BACKUPS,
    redact_phi: bool = True,
) -> None:
    """Route stdlib and structlog records through one structured renderer.

    With ``log_file`` (what the supervisor gives each service), records go to that file, appended and
    rotated by size, instead of stderr. With ``redact_phi`` (the default, ``[logs] redact_phi``), every
    record, the grid's own and those of libraries, has its patient data redacted just before it is
    rendered (dicomgrid.core.redact).
    """
    if json is None:
        json = log_file is not None or not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler: logging.Handler = (
        rotating_handler(log_file, max_bytes, backups) if log_file is not None else logging.StreamHandler()
    )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # Last before rendering: whatever a processor or a library added is covered too.
                *([_redact_phi] if redact_phi else []),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter that would drown the grid's own records at INFO.
    for noisy in ("pynetdicom", "cassandra", "aiokafka", "faust", "mode", "uvicorn.access", "librdkafka", "httpx",
                  "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    if logging.getLogger("pynetdicom").getEffectiveLevel() > logging.INFO:
        # pynetdicom's standard handlers format every PDU and DIMSE message they see (all presentation
        # contexts of an A-ASSOCIATE-RQ, each command set) for debug and info lines that are dropped
        # at this level: several ms per association. Servers and associations made after this skip them.
        from pynetdicom import _config as pynetdicom_config

        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    # pydicom both warns and logs about every lenient read of a sender's odd data; the grid reports
    # what it refuses itself, so its tolerance notes stay at debug.
    logging.getLogger("pydicom").setLevel(max(logging.ERROR, root.level))
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
