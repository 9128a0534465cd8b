"""Every worker FailureCode maps to one front-end error, and an unknown code is not a crash."""
import pytest

from pdserve.engine.failures import FailureCode
from pdserve.router.generation import (
    DeadlineExceeded, InvalidRequest, TransferFailed, Unavailable, failure_error,
)


@pytest.mark.parametrize("code, error", [
    (FailureCode.DEADLINE, DeadlineExceeded), (FailureCode.INVALID, InvalidRequest),
    (FailureCode.TRANSFER_FAILED, TransferFailed), (FailureCode.UNAVAILABLE, Unavailable),
    (FailureCode.CANCELLED, Unavailable),
])
def test_each_code_maps_to_its_error_as_value_or_wire_string(code, error):
    for given in (code, code.value):  # the decode stream carries the string
        mapped = failure_error(given, "why")
        assert type(mapped) is error and mapped.message == "why"


def test_an_unknown_code_is_unavailable():
    assert type(failure_error("from-a-newer-peer", "why")) is Unavailable
