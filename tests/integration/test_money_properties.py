"""Property: any sequence of credit / reserve / settle / cancel / replay keeps SPEC §1.

Each example drives one fresh tenant through real Postgres and Redis and
checks the audit (all five invariants) plus a pure model of the balance.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpp.money import ledger
from dpp.money.ledger import Reserved
from dpp.money.rules import Outcome, RunStatus
from dpp.money.rules import settle as settle_table
from tests.moneykit import claim_for_test, create_plan, create_tenant, draft, open_replica

operations = st.lists(
    st.one_of(
        st.tuples(st.just("credit"), st.integers(1, 50_000)),
        st.tuples(st.just("reserve"), st.integers(1, 20_000), st.integers(0, 100)),
        st.tuples(
            st.just("settle"),
            st.integers(0, 50),
            st.sampled_from(["COMPLETED", "FAILED", "EXPIRED"]),
            st.integers(0, 40_000),
        ),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("replay"), st.integers(0, 50)),
    ),
    min_size=1,
    max_size=25,
)


async def _scenario(database_url: str, redis_url: str, prefix: str, steps: list[tuple]) -> None:
    async with open_replica(database_url, redis_url, prefix) as replica:
        budgets, accounts = replica.budgets, replica.accounts
        if not await replica.pool.fetchval("SELECT 1 FROM plans WHERE id = 'prop'"):
            await create_plan(replica.pool, "prop", max_concurrent_runs=1000)
        tenant = await create_tenant(replica.pool, plan_id="prop")
        credits = charges = 0
        runs: list[tuple[ledger.RunDraft, str | None]] = []  # (draft, lease token)
        settled: list[ledger.SettleRequest] = []
        for index, step in enumerate(steps):
            match step:
                case ("credit", amount):
                    await budgets.credit(tenant, amount, f"credit:{tenant}:{index}")
                    credits += amount
                case ("reserve", amount, minimum_percent):
                    run = draft(amount, minimum_fee_usd_micros=amount * minimum_percent // 100)
                    if isinstance(await budgets.reserve(tenant, run), Reserved):
                        runs.append((run, None))
                case ("settle", pick, outcome, actual):
                    if not runs:
                        continue
                    run, token = runs.pop(pick % len(runs))
                    token = token or await claim_for_test(replica.pool, run.run_id)
                    request = ledger.SettleRequest(
                        run.run_id,
                        Outcome(outcome),
                        actual_cost_usd_micros=actual,
                        lease_token=token,
                    )
                    result = await budgets.settle(tenant, request)
                    expected = settle_table(
                        Outcome(outcome),
                        reserved_usd_micros=run.reserved_usd_micros,
                        minimum_fee_usd_micros=run.minimum_fee_usd_micros,
                        actual_cost_usd_micros=actual,
                    )
                    assert result.settlement == expected
                    charges += expected.charged_usd_micros
                    settled.append(request)
                case ("cancel", pick):
                    if not runs:
                        continue
                    run, _ = runs.pop(pick % len(runs))
                    request = ledger.SettleRequest(
                        run.run_id, Outcome.CANCELED, from_statuses=frozenset({RunStatus.QUEUED})
                    )
                    await budgets.settle(tenant, request)
                    settled.append(request)
                case ("replay", pick):
                    if not settled:
                        continue
                    again = await budgets.settle(tenant, settled[pick % len(settled)])
                    assert not again.applied, "a replayed settlement moved money"
        budget = await accounts.budget(tenant)
        assert budget["balance_usd_micros"] == credits - charges
        assert budget["reserved_usd_micros"] == sum(run.reserved_usd_micros for run, _ in runs)
        report = await accounts.audit(tenant)
        assert report.ok, report.violations


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=operations)
def test_random_money_sequences_keep_every_invariant(
    database_url, services, redis_prefix, steps
) -> None:
    asyncio.run(_scenario(database_url, services.redis_url, redis_prefix, steps))
