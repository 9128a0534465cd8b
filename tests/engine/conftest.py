import pytest

from tiny_models import ALL_ARCHITECTURES, save_tiny_model


@pytest.fixture(params=sorted(ALL_ARCHITECTURES))
def tiny_model(request, tmp_path):
    """(architecture, directory, transformers model)"""
    model = save_tiny_model(request.param, tmp_path / request.param)
    return request.param, tmp_path / request.param, model
