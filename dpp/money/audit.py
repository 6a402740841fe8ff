"""The audit: SPEC §1's five invariants and §7's sixth, proven from storage.

1. balance == sum(credits) - sum(charges), per tenant;
2. reserved == sum(R) over the tenant's open runs (AUDIT_REQUIRED runs count
   with what their ledger entries hold), and == the ledger's reserves minus
   its charges and refunds; and the open-run count on the tenant's row (what
   the concurrency limit decides on) == its runs QUEUED, PROCESSING or CLAIMED;
3. available >= 0;
4. every terminal run has exactly one settlement (one charge and one refund
   entry) with charged + refunded == R, and every run exactly one reserve;
5. the Redis mirror equals Postgres (callers run it once in-flight work is done);
6. (SPEC §7) every API key's spent equals what its runs imply, and no
   reservation took it above the limit in force at the time: a key above its
   limit must be at or below the spent its limit was set at (a lowered limit;
   spent rises only by reservations, which the database keeps within the
   limit). A reservation that broke a limit and was refunded back below it
   leaves no trace this can see; the database's trigger is what refuses it.

Reads only; `dpp audit` and `GET /admin/audit` print what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpp.adapters.postgres import Pool, Queries
from dpp.money.mirror import BudgetMirror
from dpp.schemas import COUNT, TIMESTAMP, USD_MICROS, Schema, all_required, obj

VIOLATIONS_MAX = 1000
TENANT_PAGE = 500

AUDIT_REPORT = Schema(
    "AuditReport",
    all_required(
        {
            "ok": {
                "type": "boolean",
                "description": "False while any violation or AUDIT_REQUIRED run exists.",
            },
            "violations": {
                "type": "array",
                "maxItems": VIOLATIONS_MAX,
                "items": obj(
                    {"invariant": {"type": "integer", "minimum": 1}},
                    required=("invariant",),
                    closed=False,
                    description="Which SPEC §1 invariant, and the numbers that break it.",
                ),
            },
            "audit_required_runs": {
                "type": "array",
                "items": all_required(
                    {
                        "run_id": {"type": "string"},
                        "tenant_id": {"type": "string"},
                        "reserved_usd_micros": USD_MICROS,
                        "reason": {"type": ["string", "null"]},
                        "created_at": TIMESTAMP,
                    }
                ),
            },
            "tenants_checked": COUNT,
        }
    ),
)


@dataclass(slots=True)
class AuditReport:
    violations: list[dict[str, Any]] = field(default_factory=list)
    audit_required_runs: list[dict[str, Any]] = field(default_factory=list)
    tenants_checked: int = 0
    runs_flagged: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations and not self.audit_required_runs

    def add(self, invariant: int, **details: Any) -> None:
        if len(self.violations) < VIOLATIONS_MAX:
            self.violations.append({"invariant": invariant, **details})

    def as_json(self) -> dict[str, Any]:
        document = {
            "ok": self.ok,
            "violations": self.violations,
            "audit_required_runs": self.audit_required_runs,
            "tenants_checked": self.tenants_checked,
        }
        assert document.keys() == AUDIT_REPORT.members
        return document


async def run_audit(
    pool: Pool,
    queries: Queries,
    mirror: BudgetMirror | None,
    *,
    tenant_id: str | None = None,
) -> AuditReport:
    report = AuditReport()
    async with (
        pool.acquire() as connection,
        connection.transaction(isolation="repeatable_read", readonly=True),
    ):
        # one snapshot: the sums and the runs agree with each other
        for row in await connection.fetch(queries["audit_tenant_sums"], tenant_id):
            report.tenants_checked += 1
            tenant = row["tenant_id"]
            balance, reserved = row["balance_usd_micros"], row["reserved_usd_micros"]
            if balance != row["credits"] - row["charges"]:
                report.add(
                    1,
                    tenant_id=tenant,
                    balance_usd_micros=balance,
                    ledger_usd_micros=row["credits"] - row["charges"],
                )
            if reserved != row["open_reserved"] or reserved != row["reserves"] - row["released"]:
                report.add(
                    2,
                    tenant_id=tenant,
                    reserved_usd_micros=reserved,
                    open_runs_usd_micros=row["open_reserved"],
                    ledger_usd_micros=row["reserves"] - row["released"],
                )
            if row["open_runs"] != row["open_count"]:
                # the open runs the concurrency limit decides on (the tenant's
                # row, migration 0012) against the runs themselves
                report.add(
                    2, tenant_id=tenant, open_runs=row["open_runs"], runs_open=row["open_count"]
                )
            if balance - reserved < 0:
                report.add(3, tenant_id=tenant, available_usd_micros=balance - reserved)
        for row in await connection.fetch(queries["audit_runs"], tenant_id):
            report.runs_flagged += 1
            report.add(
                4,
                run_id=row["run_id"],
                tenant_id=row["tenant_id"],
                status=row["status"],
                reserved_usd_micros=row["reserved_usd_micros"],
                charged_usd_micros=row["charged_usd_micros"],
                refunded_usd_micros=row["refunded_usd_micros"],
                reserve_entries=row["reserve_count"] or 0,
                charge_entries=row["charge_count"] or 0,
                refund_entries=row["refund_count"] or 0,
            )
        for row in await connection.fetch(queries["audit_key_spend"], tenant_id):
            report.add(
                6,
                key_id=row["key_id"],
                tenant_id=row["tenant_id"],
                spend_limit_usd_micros=row["spend_limit_usd_micros"],
                spent_usd_micros=row["spent_usd_micros"],
                runs_usd_micros=row["implied"],
                spent_when_limit_set_usd_micros=row["spent_when_limit_set_usd_micros"],
            )
        for row in await connection.fetch(queries["audit_required_runs"], tenant_id):
            report.audit_required_runs.append(
                {
                    "run_id": row["id"],
                    "tenant_id": row["tenant_id"],
                    "reserved_usd_micros": row["reserved_usd_micros"],
                    "reason": (row["error"] or {}).get("detail"),
                    "created_at": row["created_at"].isoformat(),
                }
            )
        budgets = await connection.fetch(
            queries["tenant_counters"], None if tenant_id is None else [tenant_id]
        )
    if mirror is not None:
        for row in budgets:
            mirrored = await mirror.read(row["id"])
            if mirrored is None:
                continue  # not mirrored (yet): rebuilt from Postgres before first use
            if (
                mirrored.balance_usd_micros != row["balance_usd_micros"]
                or mirrored.reserved_usd_micros != row["reserved_usd_micros"]
            ):
                report.add(
                    5,
                    tenant_id=row["id"],
                    postgres={
                        "balance_usd_micros": row["balance_usd_micros"],
                        "reserved_usd_micros": row["reserved_usd_micros"],
                    },
                    redis={
                        "balance_usd_micros": mirrored.balance_usd_micros,
                        "reserved_usd_micros": mirrored.reserved_usd_micros,
                    },
                )
    return report
