"""Placeholder until the service lands: mounts nothing."""

from __future__ import annotations

from typing import Any


def qido_routes(site: Any) -> list[Any]:
    return []
