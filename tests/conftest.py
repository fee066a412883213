import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import backends as _backends  # noqa: E402


@pytest.fixture(params=_backends.ALL)
def backend(request):
    """Each backend name; skipped (with the reason) where it cannot run."""
    reason = _backends.skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


def pytest_report_header(config):
    from helpers import BASE_SEED

    return f"mlx_flash test seed: MLX_FLASH_TEST_SEED={BASE_SEED}"
