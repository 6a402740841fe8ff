"""The OpenAPI document and the code agree, checked through the served app.

Two directions. Requests: for every request body schema, boundary bodies are
generated *from the schema itself* (each bound ±1, wrong types, a missing
required member, an unknown one), and the endpoint must accept exactly those
the schema accepts. Responses: every endpoint is sent the requests any client
can get wrong (no credentials, a bad key, a wrong content type, malformed
JSON, an oversized body, a bad Idempotency-Key, an unknown id), and the
autouse contract check (tests/openapi_contract_plugin.py) fails the test on
any answer, 4xx included, that the document does not list for that operation.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from jsonschema import Draft202012Validator

from dpp.app import Runtime
from dpp.http.endpoints import ADMIN_TOKEN, API_KEY, Endpoint
from dpp.http.routes import ENDPOINTS, admin_money, admin_tenancy, openapi_document
from dpp.http.routes import runs as run_routes
from dpp.schemas import Components, Schema

BASE_URL = "http://testserver"
_counter = itertools.count()


@dataclass(frozen=True, slots=True)
class Tenant:
    id: str
    key_id: str
    headers: dict[str, str]


async def new_tenant(http: httpx.AsyncClient, admin: dict[str, str], credit: int) -> Tenant:
    tenant = await http.post("/admin/tenants", json={"name": "contract"}, headers=admin)
    assert tenant.status_code == 201, tenant.text
    tenant_id = tenant.json()["id"]
    key = await http.post(f"/admin/tenants/{tenant_id}/api-keys", headers=admin)
    assert key.status_code == 201, key.text
    if credit:
        credited = await http.post(
            f"/admin/tenants/{tenant_id}/credits",
            json={"amount_usd_micros": credit},
            headers={**admin, "Idempotency-Key": f"seed-{tenant_id}"},
        )
        assert credited.status_code == 201, credited.text
    return Tenant(tenant_id, key.json()["id"], {"Authorization": f"Bearer {key.json()['api_key']}"})


# --- requests: the schema and the validator accept the same bodies -------------------------


def _validator(schema: Schema) -> Draft202012Validator:
    components = Components()
    root = components.render(schema)
    return Draft202012Validator({**root, "components": {"schemas": components.schemas}})


def _values(name: str, property_schema: dict[str, Any]) -> Iterator[Any]:
    """Values at and just past each bound the property's schema states, and of other
    JSON types (a validator must refuse what the schema refuses, and no more)."""
    types = property_schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if "integer" in types:
        low, high = property_schema.get("minimum"), property_schema.get("maximum")
        for bound in (low, high):
            if bound is not None:
                yield from (bound - 1, bound, bound + 1)
        yield from (1.5, "1", True)
    if "string" in types:
        low = property_schema.get("minLength", 0)
        high = property_schema.get("maxLength")
        yield "x" * low if low else ""
        yield "x" * max(low, 1)
        if high is not None:
            yield from ("x" * high, "x" * (high + 1))
        yield from (" ", "x\u0007y", "ab-c_9")
        yield from (7, False)
    if "object" in types:
        yield {}
        limit = property_schema.get("maxProperties")
        if limit is not None:
            yield {f"k{i}": i for i in range(limit)}
            yield {f"k{i}": i for i in range(limit + 1)}
        yield "not an object"
    if "enum" in property_schema:
        yield from property_schema["enum"]
        yield "NOT_A_MEMBER"
    if "null" in types or not types:
        yield None
    yield [1]


def _bodies(schema: Schema, valid: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``valid`` itself, then one change at a time: each member's boundary values,
    each required member left out, an unknown member added, not an object."""
    yield "valid", valid
    for name, property_schema in schema.properties.items():
        for value in _values(name, property_schema):
            yield f"{name}={value!r:.40}", {**valid, name: value}
    for name in schema.required:
        yield f"without {name}", {k: v for k, v in valid.items() if k != name}
    for name in schema.properties:
        if name not in schema.required and name in valid:
            yield f"without optional {name}", {k: v for k, v in valid.items() if k != name}
    yield "unknown member", {**valid, "zz_unknown": 1}
    yield "a list", [valid]


def _accepted(response: httpx.Response) -> bool:
    """Did the endpoint accept the body's shape? 422 (and 400 for a body that is not
    an object) is a refusal; anything else (2xx, 402, 404, 409, 429) got past the
    checks."""
    assert response.status_code != 500, response.text
    return response.status_code not in (400, 422)


Send = Callable[[str, Any], Awaitable[httpx.Response]]


async def _agree(
    schema: Schema,
    valid: dict[str, Any],
    send: Send,
    *,
    state_refusal: Callable[[httpx.Response], bool] = lambda response: False,
) -> None:
    """Every generated body: the schema and the endpoint agree on accepting it.
    ``state_refusal`` marks a 422 about stored state (an unknown plan) that no
    static schema can know: the body's shape was accepted."""
    validator = _validator(schema)
    disagreements = []
    cases = list(_bodies(schema, valid))
    assert len(cases) > 10
    for label, body in cases:
        response = await send(label, body)
        accepted = _accepted(response) or state_refusal(response)
        if validator.is_valid(body) != accepted:
            disagreements.append(
                f"{label}: the schema {'accepts' if validator.is_valid(body) else 'refuses'}, "
                f"the endpoint answered {response.status_code} {response.text[:200]}"
            )
    assert not disagreements, f"{schema.name}:\n" + "\n".join(disagreements)


async def test_plan_bodies(http: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    async def send(label: str, body: Any) -> httpx.Response:
        if isinstance(body, dict) and "id" in body and not label.startswith("id="):
            body = {**body, "id": f"p{next(_counter)}"}  # ids are unique: a fresh one
        return await http.post("/admin/plans", json=body, headers=admin_headers)

    valid = {"id": "gold", "requests_per_minute": 60, "max_concurrent_runs": 2}
    await _agree(admin_tenancy.PLAN_CREATE, {**valid, "retention_days": 7}, send)


async def test_tenant_bodies(http: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    async def send(label: str, body: Any) -> httpx.Response:
        return await http.post("/admin/tenants", json=body, headers=admin_headers)

    def unknown_plan(response: httpx.Response) -> bool:
        return response.status_code == 422 and "no plan" in response.json()["detail"]

    await _agree(
        admin_tenancy.TENANT_CREATE,
        {"name": "acme", "plan_id": "default"},
        send,
        state_refusal=unknown_plan,
    )


async def test_api_key_bodies(http: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    tenant = await new_tenant(http, admin_headers, credit=0)

    async def send(label: str, body: Any) -> httpx.Response:
        path = f"/admin/tenants/{tenant.id}/api-keys"
        return await http.post(path, json=body, headers=admin_headers)

    await _agree(admin_tenancy.API_KEY_CREATE, {"name": "ci", "requests_per_minute": 30}, send)


async def test_credit_bodies(http: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    tenant = await new_tenant(http, admin_headers, credit=0)

    async def send(label: str, body: Any) -> httpx.Response:
        headers = {**admin_headers, "Idempotency-Key": f"k{next(_counter)}"}
        return await http.post(f"/admin/tenants/{tenant.id}/credits", json=body, headers=headers)

    await _agree(admin_money.CREDIT_CREATE, {"amount_usd_micros": 1_000}, send)


async def test_resolve_bodies(http: httpx.AsyncClient, admin_headers: dict[str, str]) -> None:
    async def send(label: str, body: Any) -> httpx.Response:
        # an unknown run: a body that passes its checks gets the 404
        path = "/admin/runs/run_00000000000000000000000000/resolve"
        return await http.post(path, json=body, headers=admin_headers)

    await _agree(admin_money.RESOLVE_REQUEST, {"outcome": "FAILED", "charged_usd_micros": 0}, send)


async def test_run_submission_bodies(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    """The submission's schema, narrowed to one pack as its descriptions say: the
    reservation between the pack's minimum fee and cap (GET /v1/packs), inputs
    by the pack's own input schema."""
    tenant = await new_tenant(http, admin_headers, credit=10**9)
    packs = (await http.get("/v1/packs", headers=tenant.headers)).json()["packs"]
    (echo,) = [pack for pack in packs if pack["pack_type"] == "echo"]
    body = copy.deepcopy(dict(run_routes.SUBMISSION.body))
    properties = body["properties"]
    properties["pack_type"] = {"enum": ["echo"]}
    properties["inputs"] = echo["input_schema"]
    properties["max_cost_usd_micros"] = {
        **properties["max_cost_usd_micros"],
        "minimum": max(echo["minimum_fee_usd_micros"], 1),
        "maximum": echo["max_reservation_usd_micros"],
    }
    narrowed = Schema("RunSubmissionEcho", body)

    async def send(label: str, submission: Any) -> httpx.Response:
        return await http.post("/v1/runs", json=submission, headers=tenant.headers)

    valid = {
        "pack_type": "echo",
        "inputs": {"payload": 1},
        "max_cost_usd_micros": echo["default_reservation_usd_micros"],
        "timebox_sec": 30,
        "metadata": {"a": 1},
    }
    await _agree(narrowed, valid, send)


# --- responses: every answer a client can provoke is documented ----------------------------


def _path(endpoint: Endpoint, ids: dict[str, str]) -> str:
    path = endpoint.path
    for name, value in ids.items():
        path = path.replace("{" + name + "}", value)
    return path


async def test_every_answer_a_client_can_provoke_is_documented(
    runtime: Runtime, http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    tenant = await new_tenant(http, admin_headers, credit=10**9)
    known = {"tenant_id": tenant.id, "key_id": tenant.key_id, "run_id": "run_" + "0" * 26}
    unknown = {"tenant_id": "ten_" + "0" * 26, "key_id": "key_" + "0" * 26, "run_id": "bogus"}
    oversized = b'{"x": "' + b"y" * (runtime.context.settings.max_body_bytes + 1) + b'"}'
    document = openapi_document()
    sent = 0
    for endpoint in ENDPOINTS:
        if endpoint.operation_id == "revokeApiKey":
            continue  # would revoke the key the rest of the loop uses (tested elsewhere)
        credentials = {API_KEY: tenant.headers, ADMIN_TOKEN: admin_headers}.get(
            endpoint.security, {}
        )
        wrong = {"Authorization": "Bearer dpp_live_wrong"}
        attempts: list[tuple[str, dict[str, str], bytes | None, dict[str, str]]] = [
            (_path(endpoint, known), credentials, None, {}),
            (_path(endpoint, unknown), credentials, None, {}),
        ]
        if endpoint.security is not None:
            attempts += [
                (_path(endpoint, known), {}, None, {}),
                (_path(endpoint, known), wrong, None, {}),
            ]
        if endpoint.request is not None:
            json_type = {"Content-Type": "application/json"}
            attempts += [
                (_path(endpoint, known), credentials, b"{}", {"Content-Type": "text/plain"}),
                (_path(endpoint, known), credentials, b"{", json_type),
                (_path(endpoint, known), credentials, b"\xff", json_type),
                (_path(endpoint, known), credentials, oversized, json_type),
                (_path(endpoint, known), credentials, b'{"zz_unknown": 1}', json_type),
                (_path(endpoint, known), credentials, b"[]", json_type),
            ]
        if any(p.name == "Idempotency-Key" for p in endpoint.parameters):
            attempts.append(
                (_path(endpoint, known), credentials, b"{}", {"Idempotency-Key": "k" * 256})
            )
        for path, auth, content, extra in attempts:
            response = await http.request(
                endpoint.method, path, headers={**auth, **extra}, content=content
            )
            sent += 1
            assert response.status_code != 500, (endpoint.operation_id, path, response.text)
            responses = document["paths"][endpoint.path][endpoint.method.lower()]["responses"]
            assert str(response.status_code) in responses, (
                endpoint.operation_id,
                path,
                response.status_code,
            )
    assert sent > 100
