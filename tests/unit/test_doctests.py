"""The examples in the docstrings of pure modules are tests too."""

import doctest
import importlib

import pytest

MODULES = ["kiln_local.cli", "kiln_api.errors", "kiln_sdk.integrations._resume",
           "kiln_trainer_ultralytics.dataset", "kiln_runner.domain", "kiln_api.auth.keys", "kiln_api.auth.roles",
           "kiln_contracts.service", "kiln_contracts.retry", "kiln_contracts.tickets", "kiln_contracts.audit", "kiln_notifier.auth",
           "kiln_notifier.domain", "kiln_notifier.settings"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
