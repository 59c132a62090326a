"""The requests a repository makes to one bucket of an S3-compatible store, over
aiobotocore (native asyncio, the whole S3 API through botocore).

Every request goes through :meth:`ObjectStore._request`: bounded retries with backoff
(:mod:`.retry`) and one clear :class:`~backupd.errors.StorageError` per failure
(:mod:`.failures`).  botocore is set up for what S3-compatible servers accept:
checksums only where an operation requires one (no ``aws-chunked`` streaming bodies,
which e.g. Swift refuses), Content-MD5 on DeleteObjects (Swift requires it, botocore
>= 1.36 no longer sends it), payloads signed over plain HTTP and left unsigned over TLS
(TLS protects them there; the SHA-256 costs ~0.85 s of CPU per GiB), and no parameter
validation, so a part goes out as a :class:`~.body.BodyView` of the caller's buffer,
never copied whole.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from backupd.errors import ObjectNotFound, PreconditionFailed, StorageError, StorageUnsupported
from backupd.objectstore.body import SLICE, BodyView
from backupd.objectstore.failures import describe
from backupd.objectstore.objects import (
    MAX_PARTS,
    Buffer,
    ConditionalPut,
    ObjectInfo,
    PendingUpload,
)
from backupd.objectstore.retry import Backoff, RetriesSpent, with_retries
from backupd.objectstore.settings import S3Settings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

T = TypeVar("T")
DELETE_BATCH = 1000  # keys per DeleteObjects (S3's limit)


def _add_content_md5(params: dict[str, Any], **_: Any) -> None:
    body = params["body"]
    params["headers"]["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def _body(data: Buffer) -> Any:
    """The request body botocore passes on to aiohttp (its stubs know no Payload): small
    bodies as bytes, large ones as a :class:`BodyView`, which botocore, seeing a file,
    sends after ``Expect: 100-continue`` (a refusal comes before the body is sent)."""
    return BodyView(data) if memoryview(data).nbytes > SLICE else bytes(data)


def _etag(value: str) -> str:
    return value.strip('"')


class ObjectStore:
    """One bucket of one S3 endpoint.  No I/O until :meth:`connect` (or ``async with``).

    ``max_connections`` bounds the HTTP connections (so the requests in flight).
    """

    def __init__(
        self,
        settings: S3Settings,
        bucket: str,
        *,
        max_connections: int = 16,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self.bucket = bucket
        self.max_connections = max_connections
        self.backoff = backoff or Backoff(attempts=settings.max_attempts)
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint_url or "https://s3.amazonaws.com"

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    async def connect(self) -> ObjectStore:
        s = self.settings
        session = get_session()
        region = s.region or session.get_config_variable("region") or "us-east-1"
        config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": s.addressing_style, "payload_signing_enabled": not s.secure},
            retries={"total_max_attempts": 1},
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            max_pool_connections=self.max_connections,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            parameter_validation=False,
            user_agent_extra="backupd",
        )
        client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=s.endpoint_url,
                region_name=region,
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key,
                aws_session_token=s.session_token,
                verify=s.verify,
                config=config,
            )
        )
        client.meta.events.register("before-call.s3.DeleteObjects", _add_content_md5)
        self._client = client
        return self

    async def close(self) -> None:
        self._client = None
        await self._stack.aclose()

    async def __aenter__(self) -> ObjectStore:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def s3(self) -> S3Client:
        if self._client is None:
            raise StorageError(f"{self.url()}: not connected")
        return self._client

    async def _request(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` with retries; any failure as one StorageError (``what`` says
        which request, e.g. ``PUT s3://bucket/key``)."""
        attempts = 1
        try:
            return await with_retries(what, call, self.backoff)
        except RetriesSpent as spent:
            attempts, exc = spent.attempts, spent.cause
        except Exception as e:
            exc = e
        raise describe(
            exc,
            what,
            endpoint=self.endpoint,
            bucket=self.bucket,
            access_key_id=self.settings.access_key_id,
            attempts=attempts,
        ) from exc

    # -- single objects ---------------------------------------------------------------

    async def put(
        self,
        key: str,
        data: Buffer,
        *,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Store ``data`` as ``key`` in one request; returns the ETag.  ``if_absent``
        sends ``If-None-Match: *``: :class:`PreconditionFailed` when ``key`` exists,
        :class:`StorageUnsupported` where the server cannot (see
        :meth:`probe_conditional_put`).  ``metadata``: user metadata (``x-amz-meta-*``)."""
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        if metadata:
            extra["Metadata"] = dict(metadata)

        async def call() -> str:
            reply = await self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=_body(data),
                **extra,
            )
            return _etag(reply["ETag"])

        return await self._request(f"PUT {self.url(key)}", call)

    async def get(self, key: str) -> bytes:
        """The whole object."""

        async def call() -> bytes:
            reply = await self.s3.get_object(Bucket=self.bucket, Key=key)
            async with reply["Body"] as body:
                return await body.read()

        return await self._request(f"GET {self.url(key)}", call)

    async def read_into(
        self, key: str, offset: int, buf: memoryview, *, if_match: str | None = None
    ) -> None:
        """Fill ``buf`` with the object's bytes from ``offset`` (one ranged GET,
        received straight into ``buf``); an object too short for it is an error.
        ``if_match``: only from the object with that ETag (:class:`PreconditionFailed`
        once it was replaced)."""
        want = len(buf)
        if want == 0:
            return
        what = f"GET {self.url(key)} bytes {offset}-{offset + want - 1}"
        extra: dict[str, Any] = {"IfMatch": f'"{if_match}"'} if if_match else {}

        async def call() -> None:
            reply = await self.s3.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + want - 1}", **extra
            )
            async with reply["Body"] as body:
                if reply["ContentLength"] != want or "ContentRange" not in reply:
                    raise StorageError(
                        f"{what}: the object is shorter than that "
                        f"({reply['ContentLength']} bytes answered)"
                    )
                done = 0
                while done < want:
                    n = await body.readinto(buf[done:])  # type: ignore[arg-type]
                    if not n:
                        raise ConnectionResetError("the body ended early")
                    done += n

        await self._request(what, call)

    async def head(self, key: str) -> ObjectInfo:
        """Size, ETag and modification time; :class:`ObjectNotFound` when absent."""
        what = f"HEAD {self.url(key)}"

        async def call() -> ObjectInfo:
            reply = await self.s3.head_object(Bucket=self.bucket, Key=key)
            return ObjectInfo(
                key,
                reply["ContentLength"],
                _etag(reply["ETag"]),
                reply["LastModified"],
                dict(reply.get("Metadata") or {}),
            )

        try:
            return await self._request(what, call)
        except StorageError as e:
            if e.status in (400, 403, 404) and not e.code.isalpha():
                # a HEAD answer has no body, so no error code: ask again with a GET of
                # one byte, whose answer names the error (NoSuchBucket vs NoSuchKey ...)
                await self._explain(key, what)
            raise

    async def _explain(self, key: str, what: str) -> None:
        """Raise the error a one-byte GET of ``key`` names, when it names one."""

        async def call() -> None:
            reply = await self.s3.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
            reply["Body"].close()

        try:
            await self._request(what, call)
        except StorageError as e:
            if e.code.isalpha() and e.code != "InvalidRange":  # InvalidRange: empty, exists
                raise

    # -- many objects -------------------------------------------------------------

    async def list_objects(
        self, prefix: str, *, page_size: int = 1000
    ) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order, one request
        per ``page_size`` keys (1,000 is the most a server returns)."""
        async for page in self._pages({"Prefix": prefix, "MaxKeys": page_size}):
            for item in page.get("Contents", ()):
                yield ObjectInfo(
                    item["Key"], item["Size"], _etag(item["ETag"]), item["LastModified"]
                )

    async def list_prefixes(self, prefix: str, delimiter: str = "/") -> list[str]:
        """The "folders" right under ``prefix`` (common prefixes up to ``delimiter``)."""
        return [
            p["Prefix"]
            async for page in self._pages({"Prefix": prefix, "Delimiter": delimiter})
            for p in page.get("CommonPrefixes", ())
        ]

    async def _pages(self, query: dict[str, Any]) -> AsyncIterator[Any]:
        """The pages of one ListObjectsV2 listing, each with retries."""
        args: dict[str, Any] = {"Bucket": self.bucket, **query}

        async def call() -> Any:
            return await self.s3.list_objects_v2(**args)

        while True:
            page = await self._request(f"LIST {self.url(query['Prefix'])}", call)
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            args["ContinuationToken"] = token

    async def delete_many(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` (1,000 per request); keys already absent are no error."""
        pending = list(keys)
        for start in range(0, len(pending), DELETE_BATCH):
            batch = pending[start : start + DELETE_BATCH]
            what = f"DELETE {len(batch)} objects under {self.url()}"

            async def call(batch: list[str] = batch) -> Any:
                return await self.s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )

            reply = await self._request(what, call)
            errors = [e for e in reply.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise StorageError(
                    f"DELETE {self.url(first.get('Key', ''))} failed: {first.get('Code')}: "
                    f"{first.get('Message', '')} ({len(errors)} of {len(batch)} keys failed)",
                    code=str(first.get("Code", "")),
                )

    # -- multipart uploads --------------------------------------------------------

    async def create_multipart(self, key: str, *, metadata: Mapping[str, str] | None = None) -> str:
        """Begin a multipart upload of ``key`` (with user ``metadata``, if any); returns
        its upload id."""
        extra: dict[str, Any] = {"Metadata": dict(metadata)} if metadata else {}

        async def call() -> str:
            reply = await self.s3.create_multipart_upload(Bucket=self.bucket, Key=key, **extra)
            return reply["UploadId"]

        return await self._request(f"CREATE-UPLOAD {self.url(key)}", call)

    async def upload_part(self, key: str, upload_id: str, number: int, data: Buffer) -> str:
        """Upload part ``number`` (1-10000, in any order; >= 5 MiB unless it is the
        last); returns its ETag."""
        if not 1 <= number <= MAX_PARTS:
            raise ValueError(f"part number {number} outside 1-{MAX_PARTS}")

        async def call() -> str:
            reply = await self.s3.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=_body(data),
            )
            return _etag(reply["ETag"])

        return await self._request(f"UPLOAD-PART {number} of {self.url(key)}", call)

    async def complete_multipart(self, key: str, upload_id: str, etags: Mapping[int, str]) -> str:
        """Join the parts (``number -> ETag``) into the object; returns its ETag."""
        parts: list[Any] = [{"PartNumber": n, "ETag": f'"{etags[n]}"'} for n in sorted(etags)]

        async def call() -> str:
            reply = await self.s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            return _etag(reply["ETag"])

        try:
            return await self._request(f"COMPLETE-UPLOAD {self.url(key)}", call)
        except ObjectNotFound as gone:
            # a retry after the connection broke may find the upload already completed
            if gone.code != "NoSuchUpload":
                raise
            with contextlib.suppress(ObjectNotFound):
                info = await self.head(key)
                if info.etag.endswith(f"-{len(parts)}"):
                    return info.etag
            raise

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an upload and its parts; one already gone is no error."""

        async def call() -> None:
            await self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

        with contextlib.suppress(ObjectNotFound):
            await self._request(f"ABORT-UPLOAD {self.url(key)}", call)

    async def pending_uploads(self, prefix: str) -> list[PendingUpload]:
        """Multipart uploads under ``prefix`` neither completed nor aborted, with the
        time each began (to clean up after a killed run, by age)."""
        found: list[PendingUpload] = []
        markers: dict[str, str] = {}
        while True:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, **markers}

            async def call(args: dict[str, Any] = args) -> Any:
                return await self.s3.list_multipart_uploads(**args)

            page = await self._request(f"LIST-UPLOADS {self.url(prefix)}", call)
            found += [
                PendingUpload(u["Key"], u["UploadId"], u["Initiated"])
                for u in page.get("Uploads", ())
            ]
            if not page.get("IsTruncated"):
                return found
            markers = {
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }

    # -- what the server can do ---------------------------------------------------

    async def probe_conditional_put(self, key: str) -> ConditionalPut:
        """Whether ``If-None-Match: *`` on PUT works, tried on ``key`` (which must not
        exist; it is removed afterwards): created once, then refused the second time."""
        try:
            await self.put(key, b"", if_absent=True)
        except StorageUnsupported:
            return ConditionalPut.UNSUPPORTED
        try:
            await self.put(key, b"", if_absent=True)
        except PreconditionFailed:
            return ConditionalPut.SUPPORTED
        finally:
            await self.delete_many([key])
        return ConditionalPut.IGNORED
