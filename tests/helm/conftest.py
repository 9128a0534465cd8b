"""The chart tests need helm-python-sdk (the test extra); without it they are not collected."""
from __future__ import annotations

import importlib.util
import json

import pytest

if importlib.util.find_spec("helm_python") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    import helm_python as helm
    import jsonschema

    from chart_render import CHART_DIR, CRD_SCHEMA, strict

    @pytest.fixture(scope="module")
    def chart():
        with helm.Chart.load(CHART_DIR) as loaded:
            yield loaded

    @pytest.fixture(scope="module")
    def rayservice_validator():
        return jsonschema.Draft7Validator(strict(json.loads(CRD_SCHEMA.read_text())))
