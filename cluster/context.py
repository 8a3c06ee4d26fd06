"""What a unit's code can ask about the unit it runs: its index and its random generator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

_current: ContextVar[tuple[int, int]] = ContextVar("cluster_unit")
# the job a worker runs, and how to verify what the cluster's code key signed for it
Verify = Callable[[str, bytes, bytes], bool]
_job: ContextVar[tuple[str, Verify]] = ContextVar("cluster_job")


def enter_unit(seed: int, index: int) -> Token[tuple[int, int]]:
    """``running_unit`` without a context manager (the worker's loop, once per unit): pass
    the token to ``leave_unit``."""
    return _current.set((seed, index))


def leave_unit(token: Token[tuple[int, int]]) -> None:
    _current.reset(token)


@contextmanager
def running_unit(seed: int, index: int) -> Iterator[None]:
    """Make ``unit_rng`` and ``unit_index`` answer for unit ``index`` of a job seeded ``seed``."""
    token = _current.set((seed, index))
    try:
        yield
    finally:
        _current.reset(token)


@contextmanager
def running_job(jid: str, verify: Verify) -> Iterator[None]:
    """For ``tasks``: the job whose unit runs, and a check of signatures by the cluster's code
    key (its public half: nothing secret)."""
    token = _job.set((jid, verify))
    try:
        yield
    finally:
        _job.reset(token)


def current_job() -> tuple[str, Verify]:
    try:
        return _job.get()
    except LookupError:
        raise RuntimeError("no cluster job is running here") from None


def unit_seed() -> int:
    """The seed of the job whose unit is being computed."""
    return _current.get()[0]


def unit_index() -> int:
    """Index (position in scatter order) of the unit being computed."""
    return _current.get()[1]


def unit_rng() -> np.random.Generator:
    """A generator that depends only on the job's seed and the unit's index.

    A re-run with the same seed, or a reissued unit, draws the very same numbers
    (``SeedSequence(seed, spawn_key=(index,))``).
    """
    import numpy as np  # here: an agent, which imports this package, needs no numpy

    try:
        seed, index = _current.get()
    except LookupError:
        raise RuntimeError("unit_rng() is only available inside compute()") from None
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
