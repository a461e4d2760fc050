"""Structured logging for every grid process: one JSON object per line (or key=value on a terminal)."""

from __future__ import annotations

import logging
import sys
import warnings

import structlog


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """Route stdlib and structlog records through one structured renderer."""
    if json is None:
        json = not sys.stderr.isatty()
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
    handler = logging.StreamHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter that would drown the grid's own records at INFO.
    for noisy in ("pynetdicom", "cassandra", "aiokafka", "faust", "mode", "uvicorn.access", "librdkafka", "httpx",
                  "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # pydicom both warns and logs about every lenient read of a sender's odd data; the grid reports
    # what it refuses itself, so its tolerance notes stay at debug.
    logging.getLogger("pydicom").setLevel(max(logging.ERROR, root.level))
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
