"""The bare stack DPP is built on, as a baseline: hypercorn + starlette + orjson.

One process, hypercorn configured as ``dpp serve`` configures it (keep-alive,
no access log, no Server header), two routes shaped like DPP's:

  - POST /v1/runs       parses the JSON body, answers 202 with a small JSON
  - GET  /v1/runs/{id}  answers 200 with a small JSON

No auth, no validation, no database: what any app on this stack pays per
request before doing any work. ``bench/bench_ratios.py`` measures DPP against
it in the same run.

    .venv/bin/python bench/bare_app.py --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

import orjson
from hypercorn.asyncio import serve
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_ids = itertools.count(1)


def _json(content: object, status_code: int) -> Response:
    return Response(orjson.dumps(content), status_code, media_type="application/json")


async def submit(request: Request) -> Response:
    body = orjson.loads(await request.body())
    run_id = f"run_{next(_ids):026d}"
    return _json({"id": run_id, "status": "QUEUED", "pack_type": body.get("pack_type")}, 202)


async def read(request: Request) -> Response:
    return _json({"id": request.path_params["run_id"], "status": "COMPLETED"}, 200)


app = Starlette(
    routes=[
        Route("/v1/runs", submit, methods=["POST"]),
        Route("/v1/runs/{run_id}", read, methods=["GET"]),
    ]
)


def hypercorn_config(host: str, port: int) -> Config:
    """hypercorn as ``dpp serve`` configures it (also ``floor_app.py``'s)."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.keep_alive_timeout = 75
    config.backlog = 1024
    config.include_server_header = False
    config.accesslog = None
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    arguments = parser.parse_args()
    asyncio.run(serve(app, hypercorn_config(arguments.host, arguments.port)))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
