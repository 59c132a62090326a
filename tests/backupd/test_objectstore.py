"""backupd.objectstore without a real server: settings that hide the secret, the error
mapping (one line per failure), the retry policy, the part bookkeeping, and retries seen
from a fake S3 peer for what a real one will not do on demand (503 SlowDown, a body cut
off mid-transfer, a 500 that never ends)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from botocore.exceptions import ClientError, EndpointConnectionError, SSLError

from backupd.errors import (
    BucketNotFound,
    ConfigError,
    ObjectNotFound,
    PreconditionFailed,
    StorageAccessDenied,
    StorageAuthError,
    StorageError,
    StorageQuotaError,
    StorageUnreachable,
    StorageUnsupported,
)
from backupd.objectstore import Backoff, ObjectStore, S3Settings
from backupd.objectstore.body import BodyView
from backupd.objectstore.failures import describe, retryable
from backupd.objectstore.writer import _Part

SECRET = "s3cr3t-KEY-never-shown"


def test_settings_never_show_the_secret() -> None:
    s = S3Settings(
        endpoint_url="https://s3.example", access_key_id="AKIA1", secret_access_key=SECRET
    )
    for text in (repr(s), str(s), f"{s}", f"{[s]}"):
        assert SECRET not in text and "'***'" in text and "AKIA1" in text
    assert s.secure and s.verify is True
    assert S3Settings(endpoint_url="http://h", verify_tls=False).verify is False
    assert not S3Settings(endpoint_url="http://h").secure


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"endpoint": "x"},
            "unknown configuration key 's3.endpoint' (did you mean 'endpoint_url'?)",
        ),
        ({"access_key_id": "a"}, "s3.access_key_id is set but s3.secret_access_key is not"),
        ({"secret_access_key": SECRET}, "s3.secret_access_key is set but s3.access_key_id"),
        ({"addressing_style": "dns"}, "s3.addressing_style must be 'path' or 'virtual'"),
        ({"endpoint_url": "s3.example"}, "must start with http:// or https://"),
        ({"secret_access_key": 12345, "access_key_id": "a"}, "must be of type str"),
        ({"verify_tls": "yes"}, "s3.verify_tls must be of type bool"),
        ({"max_attempts": 0}, "s3.max_attempts must be at least 1"),
    ],
)
def test_settings_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        S3Settings.from_mapping(data)
    assert message in str(error.value) and SECRET not in str(error.value)
    assert "12345" not in str(error.value)  # a wrong value is never echoed


def test_settings_from_mapping() -> None:
    s = S3Settings.from_mapping(
        {"endpoint_url": "http://127.0.0.1:8080", "ca_bundle": "/etc/ca.pem", "read_timeout": 5}
    )
    assert s.verify == "/etc/ca.pem" and s.read_timeout == 5 and s.access_key_id is None


def client_error(code: str, status: int, message: str = "said the server") -> ClientError:
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {}}
    response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, "PutObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("code", "status", "kind", "words"),
    [
        ("SignatureDoesNotMatch", 403, StorageAuthError, "refused the credentials of access key"),
        ("InvalidAccessKeyId", 403, StorageAuthError, "'AKIA1' (InvalidAccessKeyId"),
        ("AccessDenied", 403, StorageAccessDenied, "access denied to access key 'AKIA1'"),
        ("403", 403, StorageAccessDenied, "PUT s3://b/k: access denied"),
        ("NoSuchBucket", 404, BucketNotFound, "bucket 'b' does not exist at http://e"),
        ("NoSuchKey", 404, ObjectNotFound, "PUT s3://b/k: no such object"),
        ("NoSuchUpload", 404, ObjectNotFound, "no such multipart upload"),
        ("EntityTooLarge", 400, StorageQuotaError, "too large or over quota"),
        ("QuotaExceeded", 403, StorageQuotaError, "too large or over quota"),
        ("PreconditionFailed", 412, PreconditionFailed, "precondition failed"),
        ("NotImplemented", 501, StorageUnsupported, "not supported by http://e"),
        ("SlowDown", 503, StorageError, "failed after 5 attempts: HTTP 503 SlowDown"),
        ("InvalidRange", 416, StorageError, "PUT s3://b/k failed: HTTP 416 InvalidRange"),
    ],
)
def test_errors_map_to_one_line(
    code: str, status: int, kind: type[StorageError], words: str
) -> None:
    error = describe(
        client_error(code, status, "line one\n  line two " + "x" * 300),
        "PUT s3://b/k",
        endpoint="http://e",
        bucket="b",
        access_key_id="AKIA1",
        attempts=5,
    )
    assert type(error) is kind and words in str(error)
    assert "\n" not in str(error) and len(str(error)) < 400
    assert error.code == code and error.status == status


def test_connection_failures_are_unreachable_and_retryable() -> None:
    refused = EndpointConnectionError(endpoint_url="http://e/b/k")
    assert retryable(refused)
    error = describe(
        refused, "GET s3://b/k", endpoint="http://e", bucket="b", access_key_id=None, attempts=4
    )
    assert isinstance(error, StorageUnreachable)
    assert (
        str(error)
        == "S3 endpoint http://e is unreachable after 4 attempts: could not connect (GET s3://b/k)"
    )
    tls = SSLError(endpoint_url="https://e", error="certificate verify failed")
    assert not retryable(tls)
    assert "TLS failed: certificate verify failed" in str(
        describe(tls, "GET", endpoint="https://e", bucket="b", access_key_id=None)
    )


@pytest.mark.parametrize(
    ("code", "status", "again"),
    [
        ("SlowDown", 503, True),
        ("ServiceUnavailable", 503, True),
        ("InternalError", 500, True),
        ("Whatever", 502, True),
        ("TooManyRequests", 429, True),
        ("NotImplemented", 501, False),
        ("AccessDenied", 403, False),
        ("NoSuchKey", 404, False),
    ],
)
def test_what_is_retried(code: str, status: int, again: bool) -> None:
    assert retryable(client_error(code, status)) is again


def test_backoff_is_exponential_and_capped() -> None:
    b = Backoff(attempts=8, base=0.2, cap=1.0)
    for failed, (low, high) in enumerate([(0.1, 0.2), (0.2, 0.4), (0.4, 0.8), (0.5, 1.0)], 1):
        assert all(low <= b.delay(failed) <= high for _ in range(50))
    assert all(0.5 <= b.delay(9) <= 1.0 for _ in range(50))


def test_part_spans_refuse_overlaps() -> None:
    part = _Part(100)
    assert part.mark(10, 20) and part.mark(30, 40) and part.mark(20, 30)
    assert part.spans == [(10, 40)] and part.covered == 30
    assert not part.mark(39, 41) and not part.mark(0, 11) and not part.mark(15, 16)
    assert part.mark(0, 10) and part.mark(40, 100) and part.covered == 100
    assert part.spans == [(0, 100)]


def test_body_view_reads_like_a_file() -> None:
    body = BodyView(bytearray(b"0123456789"))
    assert len(body) == 10 and bytes(body.read(4)) == b"0123" and body.tell() == 4
    assert bytes(body.read()) == b"456789" and bytes(body.read(3)) == b""
    assert body.seek(2) == 2 and bytes(body.read(2)) == b"23"


# -- a fake S3 peer, for answers a real server does not give on demand --------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MakeStore = Callable[[Handler], Awaitable[ObjectStore]]


@pytest.fixture
async def fake_s3() -> AsyncIterator[MakeStore]:
    """Serves one handler on a loopback port; yields a maker of connected clients."""
    runners: list[web.AppRunner] = []
    clients: list[ObjectStore] = []

    async def make(handler: Handler) -> ObjectStore:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        settings = S3Settings(
            endpoint_url=f"http://127.0.0.1:{port}",
            region="us-east-1",
            access_key_id="AKIA1",
            secret_access_key=SECRET,
        )
        client = await ObjectStore(settings, "bucket", backoff=Backoff(4, 0.01)).connect()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
    for runner in runners:
        await runner.cleanup()


def s3_error(status: int, code: str) -> web.Response:
    body = f"<Error><Code>{code}</Code><Message>{code} said the server</Message></Error>"
    return web.Response(status=status, text=body, content_type="application/xml")


async def test_slowdown_is_retried_with_backoff(
    fake_s3: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.read())
        if len(seen) <= 2:
            return s3_error(503, "SlowDown")
        return web.Response(headers={"ETag": '"abc"'})

    client = await fake_s3(handler)
    assert await client.put("k", b"payload") == "abc"
    assert seen == [b"payload"] * 3  # the same body each time
    retries = [r.getMessage() for r in caplog.records if "failed (503 SlowDown)" in r.getMessage()]
    assert len(retries) == 2 and retries[0].startswith("PUT s3://bucket/k failed")
    assert "try 2 of 4" in retries[0] and "try 3 of 4" in retries[1]
    assert SECRET not in caplog.text


async def test_a_body_cut_short_is_read_again(fake_s3: MakeStore) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        first, last = map(int, request.headers["Range"].removeprefix("bytes=").split("-"))
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}", "ETag": '"e"'}
        response = web.StreamResponse(status=206, headers=headers)
        response.content_length = last - first + 1
        await response.prepare(request)
        if calls == 1:  # half the body, then the connection goes
            await response.write(data[first : first + (last - first) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(data[first : last + 1])
        return response

    client = await fake_s3(handler)
    buf = bytearray(300_000)
    await client.read_into("k", 12345, memoryview(buf))
    assert buf == data[12345 : 12345 + len(buf)] and calls == 2


async def test_retries_are_bounded(fake_s3: MakeStore) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return s3_error(500, "InternalError")

    client = await fake_s3(handler)
    with pytest.raises(StorageError) as failed:
        await client.get("k")
    assert calls == 4
    assert str(failed.value) == (
        "GET s3://bucket/k failed after 4 attempts: HTTP 500 InternalError: "
        "InternalError said the server"
    )


async def test_complete_found_done_after_a_lost_answer(fake_s3: MakeStore) -> None:
    """The answer to CompleteMultipartUpload was lost and the retry finds no upload:
    the object is there with as many parts as were sent, so the upload did complete."""

    async def handler(request: web.Request) -> web.Response:
        if request.method == "POST":
            return s3_error(404, "NoSuchUpload")
        headers = {"ETag": '"d41d8cd98f00b204e9800998ecf8427e-2"', "Content-Length": "12"}
        headers["Last-Modified"] = "Tue, 01 Dec 2026 10:00:00 GMT"
        return web.Response(headers=headers)

    client = await fake_s3(handler)
    etag = await client.complete_multipart("k", "upload-1", {1: "a", 2: "b"})
    assert etag == "d41d8cd98f00b204e9800998ecf8427e-2"
    with pytest.raises(ObjectNotFound, match="no such multipart upload"):
        await client.complete_multipart("k", "upload-1", {1: "a", 2: "b", 3: "c"})
