"""Configuration: every default, and every bad value as one line naming its variable."""

from __future__ import annotations

import pytest

from dpp.config import ConfigError, Settings, load_settings


def test_defaults_with_nothing_set() -> None:
    settings = load_settings({})
    assert settings == Settings(
        database_url=None,
        redis_url=None,
        s3_endpoint_url=None,
        s3_result_bucket="dpp-results",
        s3_region="us-east-1",
        queue_backend="postgres",
        sqs_queue_url=None,
        sqs_endpoint_url=None,
        admin_token=None,
        cors_allowed_origins=(),
        log_level="INFO",
        json_logs=True,
        port=8000,
        host="0.0.0.0",
        lease_sec=120,
        heartbeat_sec=30,
        reaper_interval_sec=30,
        reconcile_interval_sec=60,
        reconcile_threshold_sec=300,
        shutdown_grace_sec=30,
        max_body_bytes=262_144,
        worker_concurrency=16,
        webhook_url=None,
        presign_expiry_sec=3_600,
        redis_prefix="dpp",
        development=False,
        processes=1,
        reuse_port=False,
    )


def test_values_are_read_and_normalised() -> None:
    settings = load_settings(
        {
            "DATABASE_URL": "postgresql://dpp@db.internal:5432/dpp",
            "REDIS_URL": "rediss://cache.internal:6380/0",
            "S3_ENDPOINT_URL": "https://s3.example.com",
            "DPP_QUEUE": "SQS",
            "SQS_QUEUE_URL": "https://sqs.example.com/123/dpp-runs",
            "LOG_LEVEL": "debug",
            "DPP_JSON_LOGS": "off",
            "PORT": " 9000 ",
            "DPP_CORS_ALLOWED_ORIGINS": "https://a.example.com/, http://localhost:3000",
            "DPP_ADMIN_TOKEN": "   ",
            "DPP_LEASE_SEC": "60",
            "DPP_HEARTBEAT_SEC": "10",
            "DPP_PROCESSES": "4",
            "DPP_REUSE_PORT": "yes",
        }
    )
    assert settings.queue_backend == "sqs"
    assert settings.log_level == "DEBUG"
    assert settings.json_logs is False
    assert settings.port == 9000
    assert settings.cors_allowed_origins == ("https://a.example.com", "http://localhost:3000")
    assert settings.admin_token is None  # blank is "not configured" (SPEC §6 Admin)
    assert (settings.lease_sec, settings.heartbeat_sec) == (60, 10)
    assert (settings.processes, settings.reuse_port) == (4, True)


@pytest.mark.parametrize(
    ("environment", "variable"),
    [
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"PORT": "-1"}, "PORT"),
        ({"DATABASE_URL": "mysql://db/dpp"}, "DATABASE_URL"),
        ({"DATABASE_URL": "db.internal:5432"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://cache"}, "REDIS_URL"),
        ({"S3_ENDPOINT_URL": "s3.example.com"}, "S3_ENDPOINT_URL"),
        ({"S3_RESULT_BUCKET": "Results_Bucket"}, "S3_RESULT_BUCKET"),
        ({"DPP_QUEUE": "kafka"}, "DPP_QUEUE"),
        ({"DPP_QUEUE": "sqs"}, "SQS_QUEUE_URL"),
        ({"SQS_QUEUE_URL": "queue"}, "SQS_QUEUE_URL"),
        ({"SQS_ENDPOINT_URL": "ftp://sqs"}, "SQS_ENDPOINT_URL"),
        ({"DPP_CORS_ALLOWED_ORIGINS": "*"}, "DPP_CORS_ALLOWED_ORIGINS"),
        (
            {"DPP_CORS_ALLOWED_ORIGINS": "https://ok.example, app.example"},
            "DPP_CORS_ALLOWED_ORIGINS",
        ),
        ({"DPP_CORS_ALLOWED_ORIGINS": "https://app.example/path"}, "DPP_CORS_ALLOWED_ORIGINS"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"DPP_JSON_LOGS": "maybe"}, "DPP_JSON_LOGS"),
        ({"DPP_DEVELOPMENT": "perhaps"}, "DPP_DEVELOPMENT"),
        ({"DPP_LEASE_SEC": "1"}, "DPP_LEASE_SEC"),
        ({"DPP_LEASE_SEC": "2.5"}, "DPP_LEASE_SEC"),
        ({"DPP_HEARTBEAT_SEC": "0"}, "DPP_HEARTBEAT_SEC"),
        ({"DPP_LEASE_SEC": "30", "DPP_HEARTBEAT_SEC": "30"}, "DPP_HEARTBEAT_SEC"),
        ({"DPP_REAPER_INTERVAL_SEC": "0"}, "DPP_REAPER_INTERVAL_SEC"),
        ({"DPP_RECONCILE_INTERVAL_SEC": "soon"}, "DPP_RECONCILE_INTERVAL_SEC"),
        ({"DPP_RECONCILE_THRESHOLD_SEC": "99999999"}, "DPP_RECONCILE_THRESHOLD_SEC"),
        ({"DPP_SHUTDOWN_GRACE_SEC": "3601"}, "DPP_SHUTDOWN_GRACE_SEC"),
        ({"DPP_MAX_BODY_BYTES": "10"}, "DPP_MAX_BODY_BYTES"),
        ({"DPP_WORKER_CONCURRENCY": "0"}, "DPP_WORKER_CONCURRENCY"),
        ({"DPP_WEBHOOK_URL": "file:///etc/passwd"}, "DPP_WEBHOOK_URL"),
        ({"DPP_PRESIGN_EXPIRY_SEC": "1"}, "DPP_PRESIGN_EXPIRY_SEC"),
        ({"DPP_REDIS_PREFIX": "has space"}, "DPP_REDIS_PREFIX"),
        ({"DPP_PROCESSES": "0"}, "DPP_PROCESSES"),
        ({"DPP_PROCESSES": "257"}, "DPP_PROCESSES"),
        ({"DPP_REUSE_PORT": "both"}, "DPP_REUSE_PORT"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    environment: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environment)
    message = str(caught.value)
    assert message.startswith(variable), message
    assert "\n" not in message


def test_a_bad_url_never_echoes_its_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DATABASE_URL": "mysql://dpp:hunter2@db.internal/dpp"})
    assert "hunter2" not in str(caught.value)


def test_blank_values_count_as_unset() -> None:
    assert load_settings({"PORT": "  ", "LOG_LEVEL": "", "DATABASE_URL": " "}) == load_settings({})
