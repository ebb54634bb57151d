"""Test-wide settings: wide, plain console output; one thread per test process; no network."""

import os

os.environ.setdefault("COLUMNS", "240")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it; also for subprocesses
os.environ["NO_COLOR"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never download anything
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("TARGAN_WEIGHTS", None)

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_flush_to_zero_between_tests():
    """Commands flush denormal floats for their process (core.device.pick_device); a test must not
    leave that mode on for the next one (hypothesis, for one, refuses to generate floats then)."""
    yield
    torch.set_flush_denormal(False)
