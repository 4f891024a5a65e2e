"""The method contract (`contract.py`) on every registered method."""

import pytest
from contract import MethodContract

from keras_adaptive_lora.core.method import method_names


@pytest.fixture(params=method_names())
def method_name(request):
    return request.param


class TestContract(MethodContract):
    pass
