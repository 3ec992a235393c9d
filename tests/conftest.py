"""Shared test setup: keep the harness's on-disk caches inside each test session's tmp dir."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def isolated_harness_cache(tmp_path_factory):
    """Fingerprint and embedding caches go to a fresh dir, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTN_HARNESS_CACHE", str(tmp_path_factory.mktemp("attn-harness-cache")))
    yield
    mp.undo()
