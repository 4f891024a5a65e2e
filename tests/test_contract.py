"""The method contract (`contract.py`) on every registered method."""

import pytest
from contract import MethodContract

import keras_adaptive_lora.methods  # noqa: F401  (registers the built-in methods)
from keras_adaptive_lora.core.method import method_names

BUILT_IN = ("lora", "sr-lora", "flexlora", "sinc")
#: The methods the contract runs on, read once at collection.
UNDER_CONTRACT = method_names()


@pytest.fixture(params=UNDER_CONTRACT)
def method_name(request):
    return request.param


class TestContract(MethodContract):
    pass


def test_every_built_in_method_is_under_contract():
    assert set(BUILT_IN) <= set(UNDER_CONTRACT)
