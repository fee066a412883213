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


def _seed_line() -> str:
    from helpers import BASE_SEED

    return f"mlx_flash test seed {BASE_SEED}; replay with MLX_FLASH_TEST_SEED={BASE_SEED}"


def pytest_configure(config):
    # pytest-xdist workers are fresh processes that would each draw their own
    # seed, while the header and summary print the controller's: a failure on
    # a worker could not be replayed from the log. Workers inherit this
    # process's environment, so the controller hands its seed down.
    if not hasattr(config, "workerinput"):
        from helpers import BASE_SEED

        os.environ["MLX_FLASH_TEST_SEED"] = str(BASE_SEED)


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter):
    # The header is hidden under -q; the summary is shown at every verbosity.
    terminalreporter.write_line(_seed_line())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A failure carries its seed, so a log excerpt of one failure is enough to replay it.
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("mlx_flash test seed", _seed_line()))


@pytest.fixture(autouse=True)
def _mlx_random_from_the_session_seed(request):
    """MLX's global PRNG starts from the clock, so a test that draws with
    mx.random (model weights, inputs) saw new numbers on every run and its
    failure could not be replayed. Each test now starts it from the session
    seed and its own id: the same draws for the same seed, on every worker."""
    import zlib

    import mlx.core as mx
    from helpers import BASE_SEED

    mx.random.seed((BASE_SEED * 1_000_003 + zlib.crc32(request.node.nodeid.encode())) % 2**32)


@pytest.fixture
def cpu_default_device():
    """Runs a test with the CPU as MLX's default device.

    For tests whose references are MLX computations on the default device:
    where that is a CUDA GPU, MLX multiplies float32 matrices in TF32 and
    flushes float32 subnormals, so the reference itself would be off. Kernels
    under test still get their device explicitly (stream=...)."""
    import mlx.core as mx

    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


# ---- mlx-lm patch tests (test_mlx_lm_*.py) ----

@pytest.fixture
def cpu_only():
    """Runs a test inside `mx.stream(mx.cpu)` (the mlx-lm tests' small models)."""
    import mlx.core as mx

    with mx.stream(mx.cpu):
        yield


@pytest.fixture
def fresh_stats():
    """No patch active and zeroed patch_stats() before; every patch removed after."""
    import mlx_flash

    mlx_flash.unpatch_mlx_lm()
    mlx_flash.reset_patch_stats()
    yield
    mlx_flash.unpatch_mlx_lm()
