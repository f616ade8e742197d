"""pytest plugin (entry point ``pytest11``): fixtures for testing GSA plugins."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gsa_core.registry import Registry, scoped_registry


@pytest.fixture
def gsa_registry() -> Iterator[Registry]:
    """A fresh registry with installed plugins loaded; registrations made in the test vanish after it."""
    with scoped_registry() as registry:
        yield registry


@pytest.fixture
def gsa_empty_registry() -> Iterator[Registry]:
    """A fresh registry that loads no entry point at all."""
    with scoped_registry(autoload=False) as registry:
        yield registry
