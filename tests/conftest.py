"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch

# One intra-op thread for the whole session, set before any test builds a oneDNN primitive.
# Tiny models run fastest on one thread, and two OpenMP threads stall badly on a shared CPU
# (CI, pytest-xdist). More important, the count must not change mid-session: oneDNN does not
# support executing a cached primitive with another thread count than it was created with,
# and a suite that switched between 2 and 1 threads per test crashed once in CI (SIGSEGV in a
# convolution backward). Tests that need another count run a subprocess.
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Check that the session's single intra-op thread is still in place (files of tiny
    models opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``); a test that
    changed the count would otherwise go unnoticed until a crash."""
    assert torch.get_num_threads() == 1, "a test changed torch's thread count"
    yield
    assert torch.get_num_threads() == 1, "this test changed torch's thread count"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits, prepared (convflat.data.prepare) once per test module."""
    from convflat.data import load_prepared, prepare

    return load_prepared(prepare("sklearn-digits", root=tmp_path_factory.mktemp("data")))
