"""Sub-operations shorten pynetdicom's idle sleep only while they run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dicomgrid.consumers.retrieve_scp import SUB_OPERATION_LOOP_DELAY_S, _responsive


def test_the_idle_delay_is_short_during_sub_operations_and_restored_after() -> None:
    assoc = SimpleNamespace(dul=SimpleNamespace(_run_loop_delay=0.001))
    with _responsive(assoc):  # type: ignore[arg-type]
        assert assoc.dul._run_loop_delay == SUB_OPERATION_LOOP_DELAY_S
    assert assoc.dul._run_loop_delay == 0.001

    with pytest.raises(RuntimeError), _responsive(assoc):  # type: ignore[arg-type]
        raise RuntimeError("association aborted")
    assert assoc.dul._run_loop_delay == 0.001


def test_a_dul_without_the_setting_is_left_alone() -> None:
    assoc = SimpleNamespace(dul=SimpleNamespace())
    with _responsive(assoc):  # type: ignore[arg-type]
        assert not hasattr(assoc.dul, "_run_loop_delay")
