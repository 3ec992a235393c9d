"""Shared test setup: caches inside each session's tmp dir; the device pinned to CPU.

Tests compare against CPU results (committed baselines, in-process CPU models), so ``auto``
means CPU here on any machine (``ATTN_DEVICE=cpu``); tests that need CUDA are marked ``cuda``,
ask for it explicitly and are skipped without it.
"""

import pytest


@pytest.fixture(autouse=True, scope="session")
def isolated_harness_cache(tmp_path_factory):
    """Fingerprint and embedding caches go to a fresh dir, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTN_HARNESS_CACHE", str(tmp_path_factory.mktemp("attn-harness-cache")))
    mp.setenv("ATTN_DEVICE", "cpu")
    yield
    mp.undo()


def pytest_collection_modifyitems(config, items):
    """Skip ``cuda``-marked tests where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
