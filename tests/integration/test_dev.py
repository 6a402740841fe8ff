"""`dpp dev` with nothing configured: embedded services, a serving API, a clean exit.

This is the README's first command as a new developer meets it, so it runs
the real thing in a subprocess: a fresh ./.dpp, initdb included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

STARTUP_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.25
CONFIGURED_PREFIXES = ("DPP_", "DATABASE_URL", "REDIS_URL", "S3_", "SQS_", "AWS_", "PORT")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def status_of(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None  # not listening yet


def wait_until_ready(process: subprocess.Popen[bytes], base_url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"dpp dev exited early with {process.returncode}"
        if status_of(f"{base_url}/readyz") == 200:
            return
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"dpp dev not ready after {STARTUP_TIMEOUT_S} s")


def get_json(url: str, api_key: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        document: dict[str, Any] = json.loads(response.read())
        return document


def wait_for_api_key(process: subprocess.Popen[bytes], stdout_path: Path) -> str:
    """The ready key `dev` prints once its server answers (SPEC §5)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"dpp dev exited early with {process.returncode}"
        for line in stdout_path.read_text().splitlines():
            if line.startswith("dpp dev: api key   "):
                key = line.split()[4]
                assert key.startswith("dpp_live_"), line
                return key
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"no API key printed after {STARTUP_TIMEOUT_S} s")


def stop_leftover_postgres(data_directory: Path) -> None:
    """Only after a failed test: the embedded postmaster runs in its own session."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int((data_directory / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGINT)  # "fast" shutdown


@pytest.mark.slow
def test_dev_runs_on_the_embedded_default_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(CONFIGURED_PREFIXES)
    }
    environment["PORT"] = str(port)
    base_url = f"http://127.0.0.1:{port}"
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dpp.cli", "dev"],
            cwd=tmp_path,
            env=environment,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        try:
            wait_until_ready(process, base_url)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{stderr_path.read_text()}") from None
        assert status_of(f"{base_url}/health") == 200
        assert status_of(f"{base_url}/readyz") == 200
        key = wait_for_api_key(process, stdout_path)
        budget = get_json(f"{base_url}/v1/budget", key)
        assert budget["balance_usd_micros"] == 100_000_000

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_TIMEOUT_S) == 0, stderr_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
            stop_leftover_postgres(tmp_path / ".dpp" / "postgres")

    output = stdout_path.read_text()
    errors = stderr_path.read_text()
    assert "Traceback" not in errors, errors
    dev_lines = [line for line in output.splitlines() if line.startswith("dpp dev: ")]
    assert any(line.startswith("dpp dev: postgres  embedded") for line in dev_lines), output
    assert any(line.startswith("dpp dev: redis     embedded") for line in dev_lines), output
    # results on disk (SPEC §5), so no embedded S3 is started for them
    assert any(line.startswith("dpp dev: results   on disk") for line in dev_lines), output
    assert not any(line.startswith("dpp dev: s3") for line in dev_lines), output
    assert any(line.endswith(f"127.0.0.1:{port}  (Ctrl-C stops)") for line in dev_lines), output
    # the generated admin token is kept for next time and never printed
    token = (tmp_path / ".dpp" / "admin_token").read_text().strip()
    assert token and token not in output and token not in errors
    assert (tmp_path / ".dpp" / "api_key").read_text().split()[0] == key
    # embedded Postgres stopped with us (pg_ctl removes the pid file on a clean stop)
    assert not (tmp_path / ".dpp" / "postgres" / "postmaster.pid").exists()


def dev_environment(port: int) -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(CONFIGURED_PREFIXES)
    }
    environment["PORT"] = str(port)
    return environment


def start_dev(cwd: Path, port: int, name: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    stdout_path, stderr_path = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dpp.cli", "dev"],
            cwd=cwd,
            env=dev_environment(port),
            stdout=stdout,
            stderr=stderr,
        )
    try:
        wait_until_ready(process, f"http://127.0.0.1:{port}")
    except AssertionError as error:
        process.kill()
        process.wait()
        raise AssertionError(f"{error}\n{stderr_path.read_text()}") from None
    return process, stdout_path, stderr_path


def stop_dev(process: subprocess.Popen[bytes], stderr_path: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=EXIT_TIMEOUT_S) == 0, stderr_path.read_text()
    assert "Traceback" not in stderr_path.read_text()


def download(url: str) -> bytes:
    """A result link needs no API key (SPEC §5)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        body: bytes = response.read()
        return body


def wait_completed(base_url: str, run_id: str, api_key: str) -> dict[str, Any]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        run = get_json(f"{base_url}/v1/runs/{run_id}", api_key)
        if run["status"] == "COMPLETED":
            return run
        assert run["status"] in ("QUEUED", "PROCESSING", "CLAIMED"), run
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"run {run_id} not COMPLETED after {STARTUP_TIMEOUT_S} s")


@pytest.fixture
def dev_directory() -> Iterator[Path]:
    """A working directory outside pytest's own temporary root: as root, pgserver
    opens its data directory's parents to the ``pgserver`` user, and pytest sets
    its root back to 0700 for every test that asks for ``tmp_path``."""
    directory = Path(tempfile.mkdtemp(prefix="dpp-dev-test-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_results_survive_a_dev_restart(dev_directory: Path) -> None:
    """The embedded default keeps results on disk: after `dpp dev` stops and
    starts again (a real process restart), a COMPLETED run still downloads,
    through a fresh link and through the one handed out before the restart."""
    tmp_path = dev_directory
    processes: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        process, stdout_path, stderr_path = start_dev(tmp_path, port, "first")
        processes.append(process)
        key = wait_for_api_key(process, stdout_path)
        submit = urllib.request.Request(
            f"{base_url}/v1/runs",
            data=json.dumps({"pack_type": "echo", "inputs": {"payload": "kept"}}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(submit, timeout=5) as response:
            assert response.status == 202
            run_id = json.loads(response.read())["id"]
        run = wait_completed(base_url, run_id, key)
        link = run["result"]["download_url"]
        assert link.startswith(f"{base_url}/v1/results/"), link
        body = download(link)
        assert json.loads(body) == {"payload": "kept"}
        signing_key = tmp_path / ".dpp" / "result-signing-key"
        assert signing_key.stat().st_mode & 0o777 == 0o600
        assert signing_key.read_text().strip() not in stdout_path.read_text()
        stop_dev(process, stderr_path)

        process, _, stderr_path = start_dev(tmp_path, port, "second")
        processes.append(process)
        again = get_json(f"{base_url}/v1/runs/{run_id}", key)
        assert again["status"] == "COMPLETED"
        assert again["result"]["sha256"] == run["result"]["sha256"]
        assert download(again["result"]["download_url"]) == body
        assert download(link) == body, "a link from before the restart still works"
        stop_dev(process, stderr_path)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        stop_leftover_postgres(tmp_path / ".dpp" / "postgres")
