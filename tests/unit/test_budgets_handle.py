"""The budget handle turns the kernel's failures into the errors its callers
declare: every "not now" of the actor becomes a 503 upstream, never a 500."""

from __future__ import annotations

from typing import Any

import pytest

from dpp.actors.budget import ReservationRejected
from dpp.actors.budgets import Budgets, CreditUnavailable
from dpp.actors.kernel import ActorCrashed, ActorStopped, AskTimeout, MailboxFull
from dpp.actors.registry import KeyCoolingDown, RegistryFull
from dpp.money import ledger
from dpp.money.mirror import MirrorMissing
from dpp.money.rules import Outcome
from dpp.runs.admission import (
    ReservationBusy,
    ReservationInvalid,
    ReservationOutcomeUnknown,
    ReservationSuspended,
    ReservationTimedOut,
)
from dpp.runs.service import SettlementUnavailable
from tests.unit.test_budget_actor import TENANT, FakeMirror, FakeStore, draft


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def _failing(budgets: Budgets, error: Exception) -> None:
    async def ask(*args: Any, **kwargs: Any) -> Any:
        raise error

    budgets.registry.ask = ask  # type: ignore[method-assign]
    budgets.settlements.ask = ask  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("error", "expected", "retry_after_s"),
    [
        (MailboxFull("full"), ReservationBusy, None),
        (RegistryFull("no slot"), ReservationBusy, None),
        (ActorStopped("registry restarting"), ReservationBusy, None),
        (KeyCoolingDown("crash loop", retry_after_s=12.2), ReservationSuspended, 13),
        (AskTimeout("slow"), ReservationTimedOut, None),
        (ActorCrashed("died"), ReservationOutcomeUnknown, None),
        (ReservationRejected("UntranslatableCharacterError"), ReservationInvalid, None),
        # Redis flushed again while the actor rebuilt it: no hold, nothing reserved
        (MirrorMissing("flushed during the rebuild"), ReservationBusy, None),
    ],
)
async def test_reserve_maps_each_kernel_failure(
    error: Exception, expected: type[Exception], retry_after_s: int | None
) -> None:
    budgets = Budgets(FakeStore(), FakeMirror())
    _failing(budgets, error)
    with pytest.raises(expected) as raised:
        await budgets.reserve(TENANT, draft())
    if retry_after_s is not None:
        assert getattr(raised.value, "retry_after_s", None) == retry_after_s


@pytest.mark.parametrize(
    ("error", "retry_after_s"),
    [
        (MailboxFull("full"), 1),
        (AskTimeout("slow"), 1),
        (ActorCrashed("died"), 1),
        (RegistryFull("no slot"), 1),
        (ActorStopped("stopping"), 1),
        (KeyCoolingDown("crash loop", retry_after_s=0.2), 1),
        (KeyCoolingDown("crash loop", retry_after_s=29.5), 30),
    ],
)
async def test_settle_and_credit_say_not_now_with_a_retry_after(
    error: Exception, retry_after_s: int
) -> None:
    budgets = Budgets(FakeStore(), FakeMirror())
    _failing(budgets, error)
    with pytest.raises(SettlementUnavailable) as settled:
        await budgets.settle(TENANT, ledger.SettleRequest("run_x", Outcome.FAILED))
    assert settled.value.retry_after_s == retry_after_s
    with pytest.raises(CreditUnavailable) as credited:
        await budgets.credit(TENANT, 1_000, "credit:x")
    assert credited.value.retry_after_s == retry_after_s


async def test_a_refusal_is_not_a_failure() -> None:
    """SettleRefused is the caller's answer (409 upstream), not "not now"."""
    budgets = Budgets(FakeStore(), FakeMirror())
    _failing(budgets, ledger.SettleRefused("run_x", "COMPLETED", "already settled"))
    with pytest.raises(ledger.SettleRefused):
        await budgets.settle(TENANT, ledger.SettleRequest("run_x", Outcome.FAILED))
