"""Typed messages of the toy account actors the kernel tests supervise."""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from dpp.actors.kernel import Reply


@dataclass(frozen=True, slots=True)
class Deposit:
    amount: int


@dataclass(frozen=True, slots=True)
class Balance:
    reply: Reply[int]


@dataclass(frozen=True, slots=True)
class Crash:
    reply: Reply[int] | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    entered: anyio.Event
    release: anyio.Event


AccountMessage = Deposit | Balance | Crash | Hold
