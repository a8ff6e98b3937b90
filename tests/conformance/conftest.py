"""Session fixtures of the conformance suite: the fetched TL tests and one run per configuration.

Each configuration runs the TL subset exactly once per session (in a subprocess, serially); the
test functions only read the cached results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness


@pytest.fixture(scope="session")
def tl_root() -> Path:
    try:
        return harness.fetch_tl_tests()
    except harness.FetchError as exc:
        pytest.skip(f"TransformerLens's test-suite could not be fetched from PyPI: {exc}")


@pytest.fixture(scope="session")
def conformance_runs(tl_root, tmp_path_factory):
    """label -> SuiteResult, computed on first request."""
    workdir = tmp_path_factory.mktemp("tl-conformance")
    cache: dict[str, harness.SuiteResult] = {}

    def get(label: str, **spec):
        if label not in cache:
            cache[label] = harness.run_suite(tl_root, label, workdir=workdir, **spec)
        return cache[label]

    return get


@pytest.fixture(scope="session")
def baseline(conformance_runs):
    return conformance_runs("baseline")
