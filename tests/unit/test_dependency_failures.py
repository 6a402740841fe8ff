"""dpp.adapters.failures: which driver errors mean "this dependency is unavailable"."""

from __future__ import annotations

import asyncpg
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ParamValidationError
from redis import exceptions as redis_errors

from dpp.adapters.failures import unavailable_dependency


def _client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("error", "dependency"),
    [
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation"), "postgres"),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), "postgres"),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), "postgres"),
        (asyncpg.exceptions.TooManyConnectionsError("too many"), "postgres"),
        (asyncpg.InterfaceError("connection is closed"), "postgres"),
        (asyncpg.InternalClientError("cannot switch to state 12"), "postgres"),
        (redis_errors.ConnectionError("refused"), "redis"),
        (redis_errors.TimeoutError("timed out"), "redis"),
        (redis_errors.BusyLoadingError("loading"), "redis"),
        (EndpointConnectionError(endpoint_url="http://s3"), "object_storage"),
        (_client_error(503, "SlowDown"), "object_storage"),
        (_client_error(500, "InternalError"), "object_storage"),
        (ConnectionRefusedError(111, "refused"), "dependency"),
        (TimeoutError(), "dependency"),
        (
            ExceptionGroup("both", [redis_errors.ConnectionError(), TimeoutError()]),
            "redis",
        ),
    ],
)
def test_unavailability_is_named(error: BaseException, dependency: str) -> None:
    assert unavailable_dependency(error) == dependency


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.UniqueViolationError("duplicate"),
        asyncpg.exceptions.UntranslatableCharacterError("\\u0000"),
        asyncpg.exceptions.CheckViolationError("balance"),
        redis_errors.ResponseError("WRONGTYPE"),
        redis_errors.NoScriptError("NOSCRIPT"),
        _client_error(404, "NoSuchKey"),
        _client_error(403, "AccessDenied"),
        ParamValidationError(report="bad"),
        AssertionError("an invariant"),
        KeyError("a bug"),
        ValueError("a bug"),
        ExceptionGroup("mixed", [redis_errors.ConnectionError(), KeyError("a bug")]),
    ],
)
def test_a_refused_statement_or_a_bug_is_not_unavailability(error: BaseException) -> None:
    assert unavailable_dependency(error) is None


def test_an_oserror_names_the_driver_it_came_from() -> None:
    def raise_from_driver_frame() -> None:
        # a frame whose module is the driver's, as a socket error raised inside it
        exec(
            "raise ConnectionResetError(104, 'reset')",
            {"__name__": "redis.asyncio.connection"},
        )

    with pytest.raises(ConnectionResetError) as caught:
        raise_from_driver_frame()
    assert unavailable_dependency(caught.value) == "redis"
