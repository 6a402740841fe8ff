"""Object storage adapter (S3 protocol, aiobotocore): results and their receipts.

The settlement receipt travels in the object's metadata
(``actual-cost-usd-micros``, ``run-id``, ``sha256``) so that reconciliation
can roll a CLAIMED run forward from the object alone. ``ResultStore`` is the
port the run actors, the reconciler and the runs service use; ``Blobs`` is its
S3 implementation.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

RECEIPT_COST = "actual-cost-usd-micros"
RECEIPT_RUN = "run-id"
RECEIPT_SHA256 = "sha256"


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    bytes: int
    content_type: str
    metadata: dict[str, str]


class ResultStore(Protocol):
    """Where results and their receipts live: S3 (``Blobs``) or local disk
    (``dpp.adapters.local_results.LocalResults``, SPEC §5)."""

    presign_expiry_sec: int

    async def ping(self) -> None:
        """Raise when the store does not answer (readiness)."""
        ...

    async def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> None:
        """Store ``body`` with its receipt in ``metadata`` (replacing any object at ``key``)."""
        ...

    async def head(self, key: str) -> StoredObject | None:
        """The object's size, type and receipt, or None when there is none."""
        ...

    async def get(self, key: str) -> bytes: ...

    async def delete(self, key: str) -> None:
        """Remove the object; removing a missing one is not an error."""
        ...

    async def presigned_get(self, key: str, *, base_url: str | None = None) -> str:
        """A download link valid for ``presign_expiry_sec``, needing no credentials.
        ``base_url`` is the API's own (``http://host:port``) as the client reached it:
        a store whose links DPP serves itself builds them on it; S3 ignores it."""
        ...


class Blobs:
    """The result bucket. One S3 client for the life of the process."""

    def __init__(self, client: S3Client, bucket: str, presign_expiry_sec: int) -> None:
        self._client = client
        self.bucket = bucket
        self.presign_expiry_sec = presign_expiry_sec

    async def ensure_bucket(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except ClientError:
            with contextlib.suppress(ClientError):
                await self._client.create_bucket(Bucket=self.bucket)

    async def ping(self) -> None:
        await self._client.head_bucket(Bucket=self.bucket)

    async def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> None:
        await self._client.put_object(
            Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, Metadata=metadata
        )

    async def head(self, key: str) -> StoredObject | None:
        try:
            answer = await self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return StoredObject(
            key=key,
            bytes=int(answer["ContentLength"]),
            content_type=answer.get("ContentType", "application/octet-stream"),
            metadata={k.lower(): v for k, v in answer.get("Metadata", {}).items()},
        )

    async def get(self, key: str) -> bytes:
        answer = await self._client.get_object(Bucket=self.bucket, Key=key)
        async with answer["Body"] as stream:
            return await stream.read()

    async def delete(self, key: str) -> None:
        await self._client.delete_object(Bucket=self.bucket, Key=key)

    async def presigned_get(self, key: str, *, base_url: str | None = None) -> str:
        return await self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.presign_expiry_sec,
        )


@contextlib.asynccontextmanager
async def open_blobs(
    endpoint_url: str | None, bucket: str, region: str, presign_expiry_sec: int
) -> AsyncIterator[Blobs]:
    session = get_session()
    config = AioConfig(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
    )
    async with session.create_client(
        "s3", endpoint_url=endpoint_url, region_name=region, config=config
    ) as client:
        yield Blobs(client, bucket, presign_expiry_sec)
