"""The three S3 client libraries measured by ``integration.bench_s3``, behind one small
async interface, each with its best transfer settings for a loopback Swift.

- aiobotocore: native asyncio (aiohttp), one client, a connection pool as large as the
  requests in flight.
- boto3 in threads: one thread-safe client, every call in a private thread pool.
- obstore: Rust ``object_store`` under asyncio; it has no part-number multipart API,
  so its upload is its own multipart writer (``put_async`` with ``chunk_size`` and
  ``max_concurrency``), parts in order.

Bodies are the caller's buffer, never copied whole: a memoryview for boto3 and obstore
(botocore's parameter validation, which would refuse one, is off), backupd's
``BodyView`` for aiobotocore (aiohttp on Python < 3.12.9 would copy a plain buffer
twice).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from backupd.objectstore.body import BodyView

POOL = 32


@dataclass(frozen=True, slots=True)
class Target:
    endpoint_url: str
    region: str
    access_key_id: str
    secret_access_key: str
    bucket: str
    signed: bool  # SigV4 over the payload (SHA-256 of every body) or UNSIGNED-PAYLOAD


class Client(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...
    async def upload(self, key: str, parts: Sequence[memoryview], inflight: int) -> None: ...
    async def read_range(self, key: str, offset: int, into: memoryview) -> None: ...
    async def count(self, prefix: str) -> int: ...
    async def delete(self, keys: Sequence[str]) -> None: ...


def _botocore_config(target: Target, config_class: Any) -> Any:
    return config_class(
        max_pool_connections=POOL,
        s3={"addressing_style": "path", "payload_signing_enabled": target.signed},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 1},
        parameter_validation=False,
    )


def _delete_md5(params: dict[str, Any], **_: Any) -> None:
    """Swift's DeleteObjects wants Content-MD5; botocore >= 1.36 stopped sending it."""
    import base64
    import hashlib

    body = params["body"]
    params["headers"]["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


class AioBotocore:
    name = "aiobotocore"

    def __init__(self, client: Any, bucket: str) -> None:
        self.c = client
        self.bucket = bucket

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, target: Target) -> AsyncIterator[AioBotocore]:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        async with get_session().create_client(
            "s3",
            endpoint_url=target.endpoint_url,
            region_name=target.region,
            aws_access_key_id=target.access_key_id,
            aws_secret_access_key=target.secret_access_key,
            config=_botocore_config(target, AioConfig),
        ) as client:
            client.meta.events.register("before-call.s3.DeleteObjects", _delete_md5)
            yield cls(client, target.bucket)

    async def put(self, key: str, data: bytes) -> None:
        await self.c.put_object(Bucket=self.bucket, Key=key, Body=data)

    async def upload(self, key: str, parts: Sequence[memoryview], inflight: int) -> None:
        upload_id = (await self.c.create_multipart_upload(Bucket=self.bucket, Key=key))["UploadId"]
        gate = asyncio.Semaphore(inflight)
        etags: dict[int, str] = {}

        async def one(number: int, data: memoryview) -> None:
            async with gate:
                reply = await self.c.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=BodyView(data),
                )
                etags[number] = reply["ETag"]

        async with asyncio.TaskGroup() as group:
            for number, data in enumerate(parts, 1):
                group.create_task(one(number, data))
        await self.c.complete_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]},
        )

    async def read_range(self, key: str, offset: int, into: memoryview) -> None:
        reply = await self.c.get_object(
            Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + len(into) - 1}"
        )
        async with reply["Body"] as body:
            done = 0
            while done < len(into):
                n = await body.readinto(into[done:])
                if not n:
                    raise EOFError(f"short read of {key}")
                done += n

    async def count(self, prefix: str) -> int:
        pages = self.c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sum([len(page.get("Contents", ())) async for page in pages])

    async def delete(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            await self.c.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
            )


class Boto3Threads:
    name = "boto3+threads"

    def __init__(self, client: Any, bucket: str, pool: ThreadPoolExecutor) -> None:
        self.c = client
        self.bucket = bucket
        self.pool = pool

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, target: Target) -> AsyncIterator[Boto3Threads]:
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=target.endpoint_url,
            region_name=target.region,
            aws_access_key_id=target.access_key_id,
            aws_secret_access_key=target.secret_access_key,
            config=_botocore_config(target, Config),
        )
        client.meta.events.register("before-call.s3.DeleteObjects", _delete_md5)
        with ThreadPoolExecutor(POOL) as pool:
            yield cls(client, target.bucket, pool)
        client.close()

    async def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kw))

    async def put(self, key: str, data: bytes) -> None:
        await self._call(self.c.put_object, Bucket=self.bucket, Key=key, Body=data)

    async def upload(self, key: str, parts: Sequence[memoryview], inflight: int) -> None:
        reply = await self._call(self.c.create_multipart_upload, Bucket=self.bucket, Key=key)
        upload_id = reply["UploadId"]
        gate = asyncio.Semaphore(inflight)
        etags: dict[int, str] = {}

        async def one(number: int, data: memoryview) -> None:
            async with gate:
                r = await self._call(
                    self.c.upload_part,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                )
                etags[number] = r["ETag"]

        async with asyncio.TaskGroup() as group:
            for number, data in enumerate(parts, 1):
                group.create_task(one(number, data))
        await self._call(
            self.c.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]},
        )

    async def read_range(self, key: str, offset: int, into: memoryview) -> None:
        def read() -> None:
            reply = self.c.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + len(into) - 1}"
            )
            body = reply["Body"]
            done = 0
            while done < len(into):
                n = body.readinto(into[done:])
                if not n:
                    raise EOFError(f"short read of {key}")
                done += n
            body.close()

        await self._call(read)

    async def count(self, prefix: str) -> int:
        def walk() -> int:
            pages = self.c.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            return sum(len(page.get("Contents", ())) for page in pages)

        return int(await self._call(walk))

    async def delete(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            await self._call(
                self.c.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
            )


class Obstore:
    name = "obstore"

    def __init__(self, store: Any) -> None:
        self.store = store

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, target: Target) -> AsyncIterator[Obstore]:
        from obstore.store import S3Store

        store = S3Store(
            target.bucket,
            endpoint=target.endpoint_url,
            region=target.region,
            access_key_id=target.access_key_id,
            secret_access_key=target.secret_access_key,
            virtual_hosted_style_request=False,
            unsigned_payload=not target.signed,
            client_options={
                "allow_http": True,
                "pool_max_idle_per_host": str(POOL),
                "timeout": "300s",
            },
            retry_config={"max_retries": 0},
        )
        yield cls(store)

    async def put(self, key: str, data: bytes) -> None:
        import obstore

        await obstore.put_async(self.store, key, data)

    async def upload(self, key: str, parts: Sequence[memoryview], inflight: int) -> None:
        import obstore

        async def chunks() -> AsyncIterator[memoryview]:
            for part in parts:
                yield part

        await obstore.put_async(
            self.store,
            key,
            chunks(),
            use_multipart=True,
            chunk_size=len(parts[0]),
            max_concurrency=inflight,
        )

    async def read_range(self, key: str, offset: int, into: memoryview) -> None:
        import obstore

        data = await obstore.get_range_async(self.store, key, start=offset, end=offset + len(into))
        into[:] = memoryview(data)

    async def count(self, prefix: str) -> int:
        import obstore

        total = 0
        async for chunk in obstore.list(self.store, prefix, chunk_size=1000):
            total += len(chunk)
        return total

    async def delete(self, keys: Sequence[str]) -> None:
        import obstore

        await obstore.delete_async(self.store, list(keys))


LIBRARIES: dict[str, Any] = {
    AioBotocore.name: AioBotocore,
    Boto3Threads.name: Boto3Threads,
    Obstore.name: Obstore,
}
