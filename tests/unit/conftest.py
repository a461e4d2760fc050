"""Fixtures shared by the unit tests."""

from tests.unit.peer_sites import sites  # noqa: F401 - the two-site payload fixture
