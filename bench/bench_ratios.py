"""Benchmark: DPP against the bare stack it is built on, in one run (issue 11).

Starts, one process each, the bare app (``bench/bare_app.py``: hypercorn +
starlette + orjson) and a real ``dpp serve`` whose runs execute on the local
results store (``DPP_RESULTS_DIR``, no S3), then loads both with ``wrk``
(``-t1``, ``bench/wrk_runs.lua``: a fresh Idempotency-Key per POST) for:

  - POST /v1/runs with an Idempotency-Key, 64 connections (req/s) and one
    connection (p50 / p99 latency);
  - GET /v1/runs/{id}, 64 connections (req/s) and one connection (p50);

alternating bare / DPP, ``--rounds`` times, and prints the medians and the
ratio DPP/bare. Between measurements it waits for DPP's queue to drain, so
each one starts from an idle server (the runs submitted execute: echo packs,
results written to the local store).

It also reports the RSS of the ``dpp serve`` process tree idle and its peak
under the POST load; the CPU seconds the tree spends per run under POST c=64,
from the load's start until its runs are settled (admission and execution
both: what bounds every row here); and (unless ``--no-echo``) echo runs submit → settled
per second (16 clients) beside procrastinate's no-op jobs per second on the
same Postgres (16 clients deferring, one worker process with concurrency 16;
``pip install -e '.[bench]'``, a bench-only tool).

``--processes N`` serves DPP with ``dpp serve --processes N``; ``--tenants T``
spreads the POST load over T tenants (the requests cycle through their keys)
instead of one.

``--floor`` adds a third server to every measurement, in the same rounds:
``bench/floor_app.py``, what DPP's design must do per run on the same stack
with none of its guarantees (a rate-limit script call, the run's row group
committed, executed in-process with its result file written durably; no auth,
validation, budget, idempotency, ledger or leases), in its own database, Redis
prefix and results directory, its queue drained before each measurement like
DPP's. The table gains floor, floor/bare and DPP/floor; the floor's CPU per run
under POST c=64 is measured like DPP's, and its echo rate (submit → COMPLETED,
the same 16 clients) beside DPP's. For submits and echo runs the ratio DPP
can reach against bare is bounded by the floor's: the floor says how much of
the gap is the stack and durable work, and how much DPP's guarantees (not for
reads: DPP answers a burst of reads with one query, the floor per request).

The load generator shares the machine's cores with both servers, so absolute
numbers understate a real deployment; compare the ratios.

``DPP_BENCH_SERVE=/path/script.py`` serves DPP with ``python script.py`` instead
(an instrumented server, or another tree's ``dpp serve`` for a before/after
table); ``DPP_BENCH_PAUSE=S`` prints the server's pid and waits S seconds
before the load, to attach py-spy.

    .venv/bin/python bench/bench_ratios.py [--seconds 5] [--rounds 3] [--floor]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpp.adapters.migrate import apply_migrations  # noqa: E402
from tests.services import delete_redis_prefix, with_database  # noqa: E402

ADMIN_TOKEN = "bench-admin-token-0123456789"
LUA = ROOT / "bench" / "wrk_runs.lua"
ECHO = {"pack_type": "echo", "inputs": {"payload": {"n": 1}}}
PENDING = "SELECT count(*) FROM runs WHERE status IN ('QUEUED', 'PROCESSING', 'CLAIMED')"
RUNS = "SELECT count(*) FROM runs"
FLOOR_PENDING = "SELECT count(*) FROM floor_runs WHERE status <> 'COMPLETED'"
FLOOR_RUNS = "SELECT count(*) FROM floor_runs"


@dataclass
class Load:
    rate: float  # requests per second
    p50_ms: float
    p99_ms: float
    bad: int  # non-2xx/3xx answers and socket errors


@dataclass
class Watched:
    """A server whose runs execute: drained before each measurement, its CPU per
    run costed under POST c=64 (DPP, and the floor with ``--floor``)."""

    process: subprocess.Popen[bytes]
    database: asyncpg.Connection
    pending: str  # counts its runs not yet done
    count: str  # counts all its runs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree_rss_kib(pid: int) -> int:
    """RSS of ``pid`` and all its descendants, KiB."""
    total = 0
    for current in tree_pids(pid):
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        except (OSError, AttributeError):
            continue
    return total


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    total = 0
    for current in tree_pids(pid):
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except OSError:
            continue
        # the fields after the command name, which may hold spaces or parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


async def wrk(
    base: str, mode: str, path: str, token: str, connections: int, seconds: float
) -> Load:
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{round(seconds)}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        base + path,
        "--",
        mode,
        path,
        token,
        secrets.token_hex(6),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    match = re.search(rb"RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if match is None:
        raise RuntimeError(f"wrk said: {out.decode()} {err.decode()}")
    requests, duration_us, p50, p99, status_errors, socket_errors = map(int, match.groups())
    return Load(requests / (duration_us / 1e6), p50 / 1e3, p99 / 1e3, status_errors + socket_errors)


async def create_tenant(session: aiohttp.ClientSession, name: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with session.post(
        "/admin/tenants", json={"name": name, "plan_id": "bench"}, headers=admin
    ) as answer:
        tenant = (await answer.json())["id"]
    async with session.post(f"/admin/tenants/{tenant}/api-keys", json={}, headers=admin) as answer:
        key = (await answer.json())["api_key"]
    async with session.post(
        f"/admin/tenants/{tenant}/credits",
        json={"amount_usd_micros": 10**13},
        headers={**admin, "Idempotency-Key": f"bench-{name}"},
    ) as answer:
        assert answer.status == 201, await answer.text()
    return str(key)


async def setup_tenants(base: str, count: int) -> list[str]:
    plan = {
        "id": "bench",
        "requests_per_minute": 1_000_000,
        "max_concurrent_runs": 100_000,
        "retention_days": 1,
    }
    async with aiohttp.ClientSession(base) as session:
        async with session.post(
            "/admin/plans", json=plan, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as answer:
            assert answer.status < 300, await answer.text()
        return [await create_tenant(session, f"t{index}") for index in range(count)]


async def drain(
    database: asyncpg.Connection, timeout_s: float = 300.0, pending: str = PENDING
) -> None:
    deadline = time.monotonic() + timeout_s
    while await database.fetchval(pending) and time.monotonic() < deadline:  # noqa: ASYNC110 - polling Postgres
        await asyncio.sleep(0.2)


async def echo_settled(
    base: str,
    key: str | None,
    database: asyncpg.Connection,
    runs: int,
    *,
    pending: str = PENDING,
    count: str = RUNS,
) -> float:
    """Echo runs per second, from the first submit until every run is settled
    (``pending`` counts the runs not yet done; the floor: no key, no headers)."""
    remaining = runs
    auth = {"Authorization": f"Bearer {key}"}
    before = await database.fetchval(count)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            headers = {**auth, "Idempotency-Key": secrets.token_hex(8)} if key else None
            async with session.post("/v1/runs", json=ECHO, headers=headers) as answer:
                assert answer.status == 202, await answer.text()

    started = time.perf_counter()
    async with aiohttp.ClientSession(base) as session:
        await asyncio.gather(*(client(session) for _ in range(16)))
    while await database.fetchval(pending):  # noqa: ASYNC110 - polling Postgres
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    assert await database.fetchval(count) - before == runs
    return runs / elapsed


PROCRASTINATE_WORKER = """
import asyncio, sys, procrastinate
app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=sys.argv[1]))
@app.task(name="noop")
async def noop() -> None:
    return None
async def main():
    async with app.open_async():
        await app.run_worker_async(concurrency=16, wait=True, install_signal_handlers=True)
asyncio.run(main())
"""


async def procrastinate_rate(database_url: str, jobs: int, *, first: bool) -> float | None:
    """procrastinate no-op jobs per second: 16 clients deferring, one worker process
    (``first``: install its schema in the database)."""
    try:
        import procrastinate
    except ImportError:
        return None
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=database_url))
    async with app.open_async():
        if first:
            await app.schema_manager.apply_schema_async()

        @app.task(name="noop")
        async def noop() -> None:
            return None

        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
            script.write(PROCRASTINATE_WORKER)
        worker = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
            [sys.executable, script.name, database_url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(3)  # the worker connects and listens
            database = await asyncpg.connect(database_url)
            remaining = jobs

            async def client() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await noop.defer_async()

            done = "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
            before = await database.fetchval(done)  # earlier rounds' jobs
            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(16)))
            while await database.fetchval(done) < before + jobs:  # noqa: ASYNC110 - polling Postgres
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - started
            await database.close()
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            os.unlink(script.name)
    return jobs / elapsed


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def median_of(loads: list[Load], field: Callable[[Load], float]) -> float:
    return statistics.median(field(load) for load in loads)


async def main(arguments: argparse.Namespace) -> None:
    admin_url = os.environ.get(
        "DPP_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("DPP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    name, prefix = f"dpp_bench_{secrets.token_hex(4)}", f"dppbench{secrets.token_hex(4)}"
    procrastinate_db = f"dpp_bench_pq_{secrets.token_hex(4)}"
    floor_name = f"dpp_bench_floor_{secrets.token_hex(4)}"
    floor_prefix = f"dppbenchfloor{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    database_url = with_database(admin_url, name)
    results_dir = tempfile.mkdtemp(prefix="dpp-bench-results-")
    keys_dir = tempfile.mkdtemp(prefix="dpp-bench-keys-")  # API keys for wrk's Lua script
    bare_port, dpp_port = free_port(), free_port()
    floor_results_dir = tempfile.mkdtemp(prefix="dpp-bench-floor-") if arguments.floor else ""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        await apply_migrations(database_url)
        processes.append(
            start(
                [sys.executable, str(ROOT / "bench" / "bare_app.py"), "--port", str(bare_port)],
                dict(os.environ),
            )
        )
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DPP_REDIS_PREFIX": prefix,
            "DPP_ADMIN_TOKEN": ADMIN_TOKEN,
            "DPP_RESULTS_DIR": results_dir,
            "DPP_RESULT_SIGNING_KEY": secrets.token_hex(32),
            "PORT": str(dpp_port),
            "DPP_HOST": "127.0.0.1",
            "LOG_LEVEL": arguments.log_level,
        }
        dpp_command = [str(ROOT / ".venv" / "bin" / "dpp"), "serve"]
        if arguments.processes > 1:
            dpp_command += ["--processes", str(arguments.processes)]
        if os.environ.get("DPP_BENCH_SERVE"):  # e.g. an instrumented server, for experiments
            dpp_command = [sys.executable, os.environ["DPP_BENCH_SERVE"]]
        server = start(dpp_command, env)
        processes.append(server)
        bare, dpp = f"http://127.0.0.1:{bare_port}", f"http://127.0.0.1:{dpp_port}"
        targets = [("bare", bare), ("dpp", dpp)]
        if arguments.floor:
            await admin.execute(f'CREATE DATABASE "{floor_name}"')
            floor_url = with_database(admin_url, floor_name)
            floor_port = free_port()
            floor = f"http://127.0.0.1:{floor_port}"
            floor_command = [
                *(sys.executable, str(ROOT / "bench" / "floor_app.py"), "--port", str(floor_port)),
                *("--database-url", floor_url, "--redis-url", redis_url),
                *("--redis-prefix", floor_prefix, "--results-dir", floor_results_dir),
            ]
            floor_server = start(floor_command, dict(os.environ))
            processes.append(floor_server)
            targets.append(("floor", floor))
        await wait_http(bare + "/v1/runs/x")
        await wait_http(dpp + "/health")
        if arguments.processes > 1:
            await asyncio.sleep(10)  # /health answered from the first replica up
        keys = await setup_tenants(dpp, arguments.tenants)
        keys_file = "@" + str(Path(keys_dir) / "keys.txt")
        Path(keys_file[1:]).write_text("\n".join(keys) + "\n")  # noqa: ASYNC240 - once, tiny
        database = await asyncpg.connect(database_url)
        async with (
            aiohttp.ClientSession(dpp) as session,
            session.post(
                "/v1/runs", json=ECHO, headers={"Authorization": f"Bearer {keys[0]}"}
            ) as answer,
        ):
            run_id = (await answer.json())["id"]
        await drain(database)
        watched = {"dpp": Watched(server, database, PENDING, RUNS)}
        floor_run_path = ""
        if arguments.floor:
            await wait_http(floor + "/v1/runs/x")  # up once its table exists
            floor_database = await asyncpg.connect(floor_url)
            watched["floor"] = Watched(floor_server, floor_database, FLOOR_PENDING, FLOOR_RUNS)
            async with (
                aiohttp.ClientSession(floor) as session,
                session.post("/v1/runs", json=ECHO) as answer,
            ):
                floor_run_path = f"/v1/runs/{(await answer.json())['id']}"
            await drain(floor_database, pending=FLOOR_PENDING)
        await asyncio.sleep(1)
        idle_rss = tree_rss_kib(server.pid)
        peak_rss = idle_rss
        if os.environ.get("DPP_BENCH_PAUSE"):  # attach a profiler to the server now
            print(f"server pid {server.pid}", flush=True)
            if arguments.floor:
                print(f"floor pid {floor_server.pid}", flush=True)
            await asyncio.sleep(float(os.environ["DPP_BENCH_PAUSE"]))

        run_path = f"/v1/runs/{run_id}"
        cases = [
            ("POST /v1/runs c=64", "post", "/v1/runs", 64),
            ("POST /v1/runs c=1", "post", "/v1/runs", 1),
            ("GET /v1/runs/{id} c=64", "get", run_path, 64),
            ("GET /v1/runs/{id} c=1", "get", run_path, 1),
        ]
        if arguments.only:
            cases = [case for case in cases if arguments.only in case[0]]
        measured: dict[tuple[str, str], list[Load]] = {}
        # the POST c=64 loads, each with its drain, per watched server
        cpu_per_run_ms: dict[str, list[float]] = {target: [] for target in watched}
        for _ in range(arguments.rounds):
            for label, mode, path, connections in cases:
                for target, base in targets:
                    token = "-"
                    if target == "dpp":
                        token = keys_file if mode == "post" and len(keys) > 1 else keys[0]
                    target_path = floor_run_path if target == "floor" and mode == "get" else path
                    watch = watched.get(target)
                    costed = watch is not None and mode == "post" and connections > 1
                    if watch is not None and costed:
                        cpu_before = tree_cpu_s(watch.process.pid)
                        runs_before = await watch.database.fetchval(watch.count)
                    load_task = asyncio.create_task(
                        wrk(base, mode, target_path, token, connections, arguments.seconds)
                    )
                    while not load_task.done():
                        if target == "dpp":
                            peak_rss = max(peak_rss, tree_rss_kib(server.pid))
                        await asyncio.sleep(0.5)
                    measured.setdefault((label, target), []).append(load_task.result())
                    if watch is not None and mode == "post":
                        await drain(watch.database, pending=watch.pending)
                    if watch is not None and costed:
                        runs = await watch.database.fetchval(watch.count) - runs_before
                        cpu_s = tree_cpu_s(watch.process.pid) - cpu_before
                        cpu_per_run_ms[target].append(1000 * cpu_s / max(runs, 1))

        print(
            f"wrk -t1, {arguments.seconds:g} s per measurement, median of {arguments.rounds}; "
            f"dpp serve --processes {arguments.processes}, {arguments.tenants} tenant(s), "
            f"LOG_LEVEL={arguments.log_level}, results on the local store"
            + ("; floor: bench/floor_app.py" if arguments.floor else "")
        )
        header = f"{'':26s} {'bare':>12s} {'DPP':>12s} {'DPP/bare':>9s}"
        if arguments.floor:
            header += f" {'floor':>12s} {'floor/bare':>10s} {'DPP/floor':>9s}"
            print(f"{header}  bad answers (bare/DPP/floor)")
        else:
            print(f"{header}  bad answers (bare/DPP)")
        for label, _, _, connections in cases:
            bare_loads, dpp_loads = measured[(label, "bare")], measured[(label, "dpp")]
            bad = "/".join(str(sum(x.bad for x in measured[(label, t)])) for t, _ in targets)
            rows = [("req/s", lambda load: load.rate)]
            if connections == 1:
                rows = [("p50 ms", lambda load: load.p50_ms)]
                if label.startswith("POST"):
                    rows.append(("p99 ms", lambda load: load.p99_ms))
            for unit, field in rows:
                b, d = median_of(bare_loads, field), median_of(dpp_loads, field)
                line = f"{label + ' ' + unit:26s} {b:12.2f} {d:12.2f} {d / b:8.2f}x"
                if arguments.floor:
                    f = median_of(measured[(label, "floor")], field)
                    line += f" {f:12.2f} {f / b:9.2f}x {d / f:8.2f}x"
                print(f"{line}  {bad}")
        print(
            f"dpp serve RSS (process tree): idle {idle_rss / 1024:.0f} MiB, "
            f"peak under load {peak_rss / 1024:.0f} MiB"
        )
        if cpu_per_run_ms["dpp"]:
            print(
                "dpp serve CPU (process tree) per run admitted and executed, POST c=64 "
                f"and its drain: {statistics.median(cpu_per_run_ms['dpp']):.2f} ms"
            )
        if cpu_per_run_ms.get("floor"):
            dpp_cpu, floor_cpu = (statistics.median(cpu_per_run_ms[t]) for t in ("dpp", "floor"))
            print(
                "floor_app CPU (process tree) per run admitted and executed, POST c=64 "
                f"and its drain: {floor_cpu:.2f} ms; DPP/floor {dpp_cpu / floor_cpu:.2f}x"
            )

        if not arguments.no_echo:
            echoes: list[float] = []
            floor_echoes: list[float] = []  # alternating with DPP's, round by round
            for _ in range(arguments.rounds):
                echoes.append(await echo_settled(dpp, keys[0], database, arguments.echo_runs))
                if arguments.floor:
                    floor_echoes.append(
                        await echo_settled(
                            floor,
                            None,
                            floor_database,
                            arguments.echo_runs,
                            pending=FLOOR_PENDING,
                            count=FLOOR_RUNS,
                        )
                    )
            echo = statistics.median(echoes)
            await admin.execute(f'CREATE DATABASE "{procrastinate_db}"')
            pq_url = with_database(admin_url, procrastinate_db)
            rates = [
                await procrastinate_rate(pq_url, arguments.echo_runs, first=index == 0)
                for index in range(arguments.rounds)
            ]
            line = f"echo runs submit->settled (16 clients): {echo:.0f} runs/s"
            pq = None
            if None in rates:
                line += "; procrastinate not installed (pip install -e '.[bench]')"
            else:
                pq = statistics.median(r for r in rates if r is not None)
                line += f"; procrastinate no-op jobs: {pq:.0f}/s; ratio {echo / pq:.2f}x"
            print(line)
            if floor_echoes:
                floor_echo = statistics.median(floor_echoes)
                line = (
                    f"floor echo runs submit->COMPLETED (16 clients): {floor_echo:.0f} runs/s; "
                    f"DPP/floor {echo / floor_echo:.2f}x"
                )
                if pq is not None:
                    line += f"; floor/procrastinate {floor_echo / pq:.2f}x"
                print(line)
        await database.close()
        if arguments.floor:
            await floor_database.close()
    finally:
        for process in reversed(processes):
            process.terminate()
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
        delete_redis_prefix(redis_url, prefix)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'DROP DATABASE IF EXISTS "{procrastinate_db}" WITH (FORCE)')
        if arguments.floor:
            delete_redis_prefix(redis_url, floor_prefix)
            await admin.execute(f'DROP DATABASE IF EXISTS "{floor_name}" WITH (FORCE)')
            shutil.rmtree(floor_results_dir, ignore_errors=True)
        await admin.close()
        shutil.rmtree(results_dir, ignore_errors=True)
        shutil.rmtree(keys_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=1, help="dpp serve --processes N")
    parser.add_argument("--tenants", type=int, default=1, help="spread the POST load over T")
    parser.add_argument("--only", help="measure only the cases whose label contains this")
    parser.add_argument("--log-level", default="INFO", help="DPP's LOG_LEVEL (default INFO)")
    parser.add_argument("--no-echo", action="store_true", help="skip echo vs procrastinate")
    parser.add_argument("--echo-runs", type=int, default=1000)
    parser.add_argument(
        "--floor", action="store_true", help="add bench/floor_app.py as a third server"
    )
    asyncio.run(main(parser.parse_args()))
