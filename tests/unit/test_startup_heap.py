"""``dpp serve`` freezes what startup built, so full collections skip it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dpp.app import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()  # the rest of the test session collects as before


def test_startup_objects_leave_the_collectors_generations(unfrozen: None) -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the cyclic collector could free it

    kept = Node()
    Node()  # garbage already: collected first, not frozen
    frozen = freeze_startup_heap()
    # (the count moves afterwards: frozen objects are still freed by refcounting)
    assert frozen > 0
    assert not any(obj is kept for obj in gc.get_objects())  # in no generation
    assert kept.me is kept
