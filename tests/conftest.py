"""Shared fixtures. Integration tests start real `meshlet proxy` processes and small
backends on 127.0.0.1 ephemeral ports; every one is stopped when its test ends."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import Control, HttpBackend, ProxyProcess, start_control

# Per-test limit for integration tests that do not set their own.
DEFAULT_TIMEOUT = 60


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running tests (still run by default)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.nodeid.split("/") and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Everything entered here is closed after the test, in reverse order."""
    with contextlib.ExitStack() as s:
        yield s


@pytest.fixture
def backend(stack: contextlib.ExitStack) -> HttpBackend:
    return stack.enter_context(HttpBackend())


@pytest.fixture
def start_proxy(stack: contextlib.ExitStack) -> Callable[..., ProxyProcess]:
    """start_proxy(app=port, env={...}, outbound=..., endpoints=...) -> running proxy,
    stopped (SIGTERM, exit status 0 asserted) after the test."""

    def start(**kw: Any) -> ProxyProcess:
        return stack.enter_context(ProxyProcess(**kw))

    return start


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    """A real `meshlet control` (identity) with its state in a temp dir."""
    yield from start_control(tmp_path / "control")
