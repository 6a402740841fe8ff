"""The `dpp` command as an operator meets it: real processes, real exit codes.

Startup failures must be one line on stderr (`dpp: ...`) and a status an
orchestrator can act on (2 = fix the configuration, 1 = anything else),
never a traceback.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg
import httpx
import pytest

from dpp.adapters import migrate
from dpp.cli import common, dev
from dpp.cli import main as cli
from dpp.config import ConfigError, Settings, load_settings
from dpp.http import server

if TYPE_CHECKING:  # imported plainly, pytest would try to collect the class
    from tests.services import TestServices

DPP = (sys.executable, "-m", "dpp.cli")
# Everything a developer's shell might have set that would change the outcome.
SCRUBBED_PREFIXES = ("DPP_", "DATABASE_URL", "REDIS_URL", "S3_", "SQS_", "PORT", "LOG_LEVEL")


def clean_environment(**values: str) -> dict[str, str]:
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith(SCRUBBED_PREFIXES)
    }
    environment.update(values)
    return environment


async def run_dpp(*args: str, environment: Mapping[str, str]) -> tuple[int, str, str]:
    with anyio.fail_after(120):
        result = await anyio.run_process(
            [*DPP, *args], env=dict(environment), check=False, stdin=None
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def assert_one_line_error(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("dpp: ")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"dpp: {expected}"), stderr
    assert stderr.rstrip("\n").splitlines()[-1] == lines[0], stderr


@pytest.fixture
def service_environment(
    services: TestServices, database_url: str, redis_prefix: str
) -> dict[str, str]:
    """What `dpp serve` needs to start for real against the test services."""
    return clean_environment(
        DATABASE_URL=database_url,
        REDIS_URL=services.redis_url,
        S3_ENDPOINT_URL=services.object_store_url,
        DPP_REDIS_PREFIX=redis_prefix,
        DPP_HOST="127.0.0.1",
        LOG_LEVEL="WARNING",
        AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "dpp-embedded"),
        AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "dpp-embedded"),
    )


@pytest.fixture
def occupied_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


# --- configuration ----------------------------------------------------------------------


async def test_bad_configuration_exits_2_with_one_line() -> None:
    status, stdout, stderr = await run_dpp(
        "serve", environment=clean_environment(DPP_LEASE_SEC="soon")
    )
    assert status == 2
    assert stderr == "dpp: DPP_LEASE_SEC='soon': expected a whole number from 2 to 86400\n"
    assert stdout == ""


async def test_serve_without_a_database_url_exits_2_naming_it() -> None:
    status, _, stderr = await run_dpp("serve", environment=clean_environment())
    assert status == 2
    assert_one_line_error(stderr, "DATABASE_URL: required")


async def test_serve_with_a_local_results_store_but_no_signing_key_refuses_to_start(
    service_environment: dict[str, str], tmp_path: Path
) -> None:
    """SPEC §5: outside development a local store needs DPP_RESULT_SIGNING_KEY;
    without one, `serve` stops before touching anything, in one line."""
    environment = {**service_environment, "DPP_RESULTS_DIR": str(tmp_path / "results")}
    status, stdout, stderr = await run_dpp("serve", environment=environment)
    assert status == 2
    assert_one_line_error(stderr, "DPP_RESULT_SIGNING_KEY: required with DPP_RESULTS_DIR")
    assert stdout == ""
    assert not (tmp_path / "results").exists()


# --- migrate ----------------------------------------------------------------------------


async def test_migrate_applies_then_checks(services: TestServices) -> None:
    versions = [m.version for m in migrate.discover()]
    async with migrate.scratch_database(services.admin_database_url) as url:
        environment = clean_environment(DATABASE_URL=url)
        status, stdout, stderr = await run_dpp("migrate", environment=environment)
        assert (status, stderr) == (0, "")
        assert stdout.splitlines() == [f"applied {version}" for version in versions]

        status, stdout, _ = await run_dpp("migrate", environment=environment)
        assert (status, stdout) == (0, "schema up to date: nothing to apply\n")

        status, stdout, _ = await run_dpp("migrate", "--check", environment=environment)
        assert (status, stdout) == (0, "schema up to date\n")

        connection = await asyncpg.connect(url)
        try:
            await connection.execute("ALTER TABLE tenants ADD COLUMN x int")
        finally:
            await connection.close()
        status, stdout, stderr = await run_dpp("migrate", "--check", environment=environment)
        assert status == 1
        assert stdout.startswith("column public.tenants.x: in the database but not")
        assert_one_line_error(stderr, "1 difference(s)")


async def test_migrate_against_an_unreachable_database_is_one_line(occupied_port: int) -> None:
    # a listener that never speaks the Postgres protocol would hang; a closed port refuses
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    environment = clean_environment(
        DATABASE_URL=f"postgresql://dpp:hunter2@127.0.0.1:{closed_port}/dpp"
    )
    status, _, stderr = await run_dpp("migrate", environment=environment)
    assert status == 1
    assert_one_line_error(stderr, "DATABASE_URL: cannot migrate")
    assert "hunter2" not in stderr


# --- serve ------------------------------------------------------------------------------


async def test_port_in_use_exits_1_with_one_line(
    service_environment: dict[str, str], occupied_port: int
) -> None:
    environment = {**service_environment, "PORT": str(occupied_port)}
    status, _, stderr = await run_dpp("serve", environment=environment)
    assert status == 1
    assert_one_line_error(stderr, f"PORT={occupied_port}: address already in use")


# --- the parser and helpers (in process) ------------------------------------------------


@pytest.mark.parametrize("command", [[], ["serve"], ["migrate"], ["dev"], ["audit"]])
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main([*command, "--help"])
    assert caught.value.code == 0
    assert "usage: dpp" in capsys.readouterr().out


def test_no_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: dpp" in capsys.readouterr().err


def test_a_startup_error_inside_a_task_group_is_still_one_line() -> None:
    error = BaseExceptionGroup("tree", [ExceptionGroup("child", [ConfigError("PORT: bad")])])
    assert cli.one_line_failure(error) == (2, "PORT: bad")
    assert cli.one_line_failure(ValueError("a bug")) is None


def test_redacted_url_hides_only_the_password() -> None:
    assert (
        common.redacted_url("postgresql://dpp:s3cret@db:5432/dpp?sslmode=require")
        == "postgresql://dpp:***@db:5432/dpp?sslmode=require"
    )
    assert common.redacted_url("redis://cache:6379/0") == "redis://cache:6379/0"


def test_admin_token_is_generated_once_and_private(tmp_path: Path) -> None:
    token = dev.admin_token(tmp_path)
    assert len(token) >= 40
    assert dev.admin_token(tmp_path) == token
    mode = stat.S_IMODE((tmp_path / dev.ADMIN_TOKEN_FILE).stat().st_mode)
    assert mode == 0o600


# --- dpp.http.server: hypercorn from code ------------------------------------------------------


def server_settings(port: int = 0, grace_sec: int = 5) -> Settings:
    return load_settings({"DPP_HOST": "127.0.0.1", "PORT": str(port)}).with_overrides(
        shutdown_grace_sec=grace_sec
    )


async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app: `/slow` takes a while, as an in-flight request at shutdown would."""
    if scope["type"] != "http":
        return  # lifespan: nothing to set up
    if scope["path"] == "/slow":
        await anyio.sleep(0.5)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


async def test_serve_http_reports_the_bound_port_and_drains_in_flight_requests() -> None:
    shutdown = anyio.Event()
    async with anyio.create_task_group() as group:
        port = await group.start(
            partial(server.serve_http, slow_app, server_settings(), shutdown_trigger=shutdown)
        )
        assert port > 0  # PORT=0 asked for any free port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/fast")).text == "/fast"
            async with anyio.create_task_group() as requests:
                answers: list[httpx.Response] = []

                async def slow() -> None:
                    answers.append(await client.get("/slow"))

                requests.start_soon(slow)
                await anyio.sleep(0.2)  # the request is in flight
                shutdown.set()
            assert [(a.status_code, a.text) for a in answers] == [(200, "/slow")]
    # the listener is gone once serve_http returns
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


async def test_serve_http_port_in_use_is_a_startup_error(occupied_port: int) -> None:
    from dpp.config import StartupError

    with pytest.raises(StartupError, match=f"^PORT={occupied_port}: address already in use$"):
        await server.serve_http(
            slow_app, server_settings(occupied_port), shutdown_trigger=anyio.Event()
        )
