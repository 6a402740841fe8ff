"""The OpenAPI document is 3.1, well-formed, and covers exactly what the app serves."""

from __future__ import annotations

from typing import Any

import httpx
from jsonschema import Draft202012Validator
from starlette.applications import Starlette

from dpp.http import openapi

# Documented operations whose routes are still being built. Shrink this set as
# each route lands; the test fails until you do, so the set stays honest.
NOT_YET_ROUTED = {
    ("POST", "/v1/runs"),
    ("GET", "/v1/runs"),
    ("GET", "/v1/runs/{run_id}"),
    ("POST", "/v1/runs/{run_id}/cancel"),
    ("GET", "/v1/budget"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/packs"),
    ("POST", "/admin/plans"),
    ("POST", "/admin/tenants"),
    ("POST", "/admin/tenants/{tenant_id}/api-keys"),
    ("DELETE", "/admin/api-keys/{key_id}"),
    ("POST", "/admin/tenants/{tenant_id}/credits"),
    ("GET", "/admin/tenants/{tenant_id}/budget"),
    ("POST", "/admin/reconcile"),
    ("GET", "/admin/audit"),
    ("POST", "/admin/runs/{run_id}/resolve"),
}

SPEC_SURFACE = {
    ("POST", "/v1/runs"),
    ("GET", "/v1/runs/{run_id}"),
    ("GET", "/v1/runs"),
    ("POST", "/v1/runs/{run_id}/cancel"),
    ("GET", "/v1/budget"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/packs"),
    ("GET", "/health"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("POST", "/admin/plans"),
    ("POST", "/admin/tenants"),
    ("POST", "/admin/tenants/{tenant_id}/api-keys"),
    ("DELETE", "/admin/api-keys/{key_id}"),
    ("POST", "/admin/tenants/{tenant_id}/credits"),
    ("GET", "/admin/tenants/{tenant_id}/budget"),
    ("GET", "/admin/actors"),
    ("POST", "/admin/reconcile"),
    ("GET", "/admin/audit"),
    ("POST", "/admin/runs/{run_id}/resolve"),
}


async def test_every_route_is_documented(app: Starlette) -> None:
    routed = openapi.routed_operations(app.routes)
    documented = openapi.documented_operations()
    assert routed <= documented, f"undocumented routes: {sorted(routed - documented)}"
    assert documented - routed == NOT_YET_ROUTED, (
        f"routed now, remove from NOT_YET_ROUTED: {sorted(NOT_YET_ROUTED & routed)}; "
        f"documented but neither routed nor listed: {sorted(documented - routed - NOT_YET_ROUTED)}"
    )


def test_the_document_covers_the_spec_surface() -> None:
    assert openapi.documented_operations() == SPEC_SURFACE


async def test_openapi_json_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert document == openapi.document()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_every_reference_resolves() -> None:
    document = openapi.document()
    refs = _refs(document)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/"), ref
        node: Any = document
        for part in ref[2:].split("/"):
            assert part in node, f"dangling {ref}"
            node = node[part]


def test_schemas_are_json_schema_2020_12() -> None:
    schemas = openapi.document()["components"]["schemas"]
    assert {"Problem", "Run", "RunList", "Budget", "Usage", "PackCatalog"} <= set(schemas)
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)


def test_operations_are_well_formed() -> None:
    document = openapi.document()
    operation_ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            operation_ids.append(operation["operationId"])
            if path.startswith("/admin"):
                assert operation["tags"] == ["admin"]
                assert operation["security"] == [{"adminToken": []}]
            elif path.startswith("/v1"):
                assert operation["security"] == [{"apiKey": []}]
                assert "admin" not in operation["tags"]
                assert "401" in operation["responses"] and "429" in operation["responses"]
            else:
                assert operation["security"] == []
            assert "500" in operation["responses"]
            for status, response in operation["responses"].items():
                assert "X-Request-ID" in response["headers"]
                if int(status) >= 400:
                    assert set(response["content"]) == {"application/problem+json"}
            parameter_names = {p["$ref"].rsplit("/", 1)[1] for p in operation["parameters"]}
            for placeholder in [p for p in path.split("/") if p.startswith("{")]:
                assert placeholder[1:-1] in parameter_names, (method, path)
    assert len(operation_ids) == len(set(operation_ids))


def _validator(document: dict[str, Any], schema_name: str) -> Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    return Draft202012Validator(root)


async def test_live_answers_match_their_schemas(client: httpx.AsyncClient) -> None:
    document = openapi.document()
    _validator(document, "Health").validate((await client.get("/health")).json())
    _validator(document, "Readiness").validate((await client.get("/readyz")).json())
    _validator(document, "Problem").validate((await client.get("/nope")).json())


def test_run_schema_matches_the_spec_run_object() -> None:
    run = openapi.document()["components"]["schemas"]["Run"]
    assert (
        set(run["required"])
        == set(run["properties"])
        == {
            "id",
            "status",
            "pack_type",
            "created_at",
            "started_at",
            "finished_at",
            "reserved_usd_micros",
            "minimum_fee_usd_micros",
            "charged_usd_micros",
            "refunded_usd_micros",
            "metadata",
            "result",
            "error",
            "retention_until",
        }
    )
    sample = {
        "id": "run_" + "a" * 26,
        "status": "QUEUED",
        "pack_type": "echo",
        "created_at": "2026-01-01T00:00:00Z",
        "started_at": None,
        "finished_at": None,
        "reserved_usd_micros": 5000,
        "minimum_fee_usd_micros": 100,
        "charged_usd_micros": None,
        "refunded_usd_micros": None,
        "metadata": {},
        "result": None,
        "error": None,
        "retention_until": None,
    }
    _validator(openapi.document(), "Run").validate(sample)
