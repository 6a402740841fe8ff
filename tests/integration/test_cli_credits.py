"""`dpp credits add`: the CLI twin of the admin credits route."""

from __future__ import annotations

import asyncio
import threading

import asyncpg
import orjson
import pytest

from dpp.actors import budgets
from dpp.cli.main import main
from tests.moneykit import create_tenant


def _tenant(database_url: str) -> str:
    async def make() -> str:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
        try:
            return await create_tenant(pool)
        finally:
            await pool.close()

    return asyncio.run(make())


@pytest.fixture
def env(monkeypatch, database_url, services, redis_prefix) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", services.redis_url)
    monkeypatch.setenv("DPP_REDIS_PREFIX", redis_prefix)


def test_credits_add_is_idempotent_per_key(env, database_url, capsys) -> None:
    tenant = _tenant(database_url)
    args = ["credits", "add", "--tenant", tenant, "--amount", "2500000", "--idempotency-key", "k1"]
    assert main(args) == 0
    first = orjson.loads(capsys.readouterr().out)
    assert first["balance_usd_micros"] == 2_500_000 and first["replayed"] is False
    assert main(args) == 0
    again = orjson.loads(capsys.readouterr().out)
    assert again["balance_usd_micros"] == 2_500_000 and again["replayed"] is True
    other = ["credits", "add", "--tenant", tenant, "--amount", "1", "--idempotency-key", "k1"]
    assert main(other) == 1
    assert "different amount" in capsys.readouterr().err


def test_a_credit_that_cannot_be_confirmed_says_retry_and_the_retry_adds_once(
    env, database_url, capsys, monkeypatch
) -> None:
    """The tenant's row is locked by another transaction past the budget actor's
    answer deadline: one line telling the operator to retry with the same key
    (not a traceback), and the retry adds the credit exactly once."""
    tenant = _tenant(database_url)
    monkeypatch.setattr(budgets, "ASK_TIMEOUT_S", 0.5)
    args = ["credits", "add", "--tenant", tenant, "--amount", "700", "--idempotency-key", "k-busy"]

    locked, release = threading.Event(), threading.Event()

    async def hold_the_tenant_row() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            async with connection.transaction():
                await connection.execute("SELECT 1 FROM tenants WHERE id = $1 FOR UPDATE", tenant)
                locked.set()
                await asyncio.to_thread(release.wait, 30)
        finally:
            await connection.close()

    holder = threading.Thread(target=asyncio.run, args=(hold_the_tenant_row(),))
    holder.start()
    try:
        assert locked.wait(10)
        assert main(args) == 1  # the CLI installs signal handlers: main thread only
    finally:
        release.set()
        holder.join(30)
    err = capsys.readouterr().err
    assert "credit not confirmed" in err and "--idempotency-key" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    outputs = []
    for _ in range(2):
        assert main(args) == 0
        outputs.append(orjson.loads(capsys.readouterr().out))
    assert [o["balance_usd_micros"] for o in outputs] == [700, 700]
    assert [o["replayed"] for o in outputs] == [False, True]


@pytest.mark.parametrize(
    ("tenant", "amount", "message"),
    [
        ("nope", "5", "--tenant"),
        ("ten_00000000000000000000000000", "-5", "--amount"),
        ("ten_00000000000000000000000000", "1.5", "--amount"),
        ("ten_00000000000000000000000000", "5", "no tenant"),
    ],
)
def test_credits_add_refuses_bad_input_in_one_line(env, capsys, tenant, amount, message) -> None:
    status = main(
        ["credits", "add", "--tenant", tenant, "--amount", amount, "--idempotency-key", "k"]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
