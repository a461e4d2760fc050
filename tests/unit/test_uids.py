import pytest

from dicomgrid.core.uids import is_valid_uid


@pytest.mark.parametrize("uid", ["1.2", "1.2.840.10008.1.2.1", "2.25.40947379571910522469075162332634843739", "1.0.3"])
def test_valid(uid):
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    ["", "1", "../../etc", "1.2.", ".1.2", "1..2", "1.02", "1.2.abc", "1.2 ", "1.2\x00", "9" * 65, "1." + "1" * 63, None, 12],
)
def test_invalid(uid):
    assert not is_valid_uid(uid)
