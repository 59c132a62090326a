"""backupd's object store client against a real S3 server (Swift with s3api): every
request a repository makes, multipart uploads in any order, and one clear error line for
bad credentials, denied access, a missing bucket or object, a quota and a dead endpoint,
with the secret key in no message and no log line."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backupd.errors import (
    BucketNotFound,
    ObjectNotFound,
    StorageAccessDenied,
    StorageAuthError,
    StorageError,
    StorageQuotaError,
    StorageUnreachable,
    StorageUnsupported,
)
from backupd.objectstore import Backoff, ConditionalPut, ObjectStore, S3Settings
from integration.harness.s3server import S3Endpoint, SwiftS3Server
from integration.harness.servers import free_port

pytestmark = pytest.mark.s3
MiB = 1 << 20
FAST = Backoff(attempts=3, base=0.01)


def settings_for(endpoint: S3Endpoint, **changes: object) -> S3Settings:
    values: dict[str, object] = {
        "endpoint_url": endpoint.endpoint_url,
        "region": endpoint.region,
        "access_key_id": endpoint.access_key_id,
        "secret_access_key": endpoint.secret_access_key,
        **changes,
    }
    return S3Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def store(s3server: SwiftS3Server, s3bucket: str) -> AsyncIterator[ObjectStore]:
    async with ObjectStore(settings_for(s3server.endpoint()), s3bucket) as client:
        yield client


def one_line(error: BaseException) -> str:
    text = str(error)
    assert text and "\n" not in text
    return text


async def test_put_get_head_list_delete(store: ObjectStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    keys = [f"vm{i % 2}/backup{i}/manifest.json" for i in range(7)]
    for i, key in enumerate(keys):
        etag = await store.put(key, f"object {i}".encode())
        assert etag == hashlib.md5(f"object {i}".encode()).hexdigest()
    assert await store.get(keys[3]) == b"object 3"
    info = await store.head(keys[3])
    assert (info.key, info.size, info.etag) == (keys[3], 8, hashlib.md5(b"object 3").hexdigest())
    assert before <= info.last_modified <= datetime.now(UTC) + timedelta(seconds=5)
    listed = [o async for o in store.list_objects("vm1/", page_size=2)]  # two pages and one
    assert [o.key for o in listed] == sorted(k for k in keys if k.startswith("vm1/"))
    assert [o.size for o in listed] == [8, 8, 8]
    assert await store.list_prefixes("") == ["vm0/", "vm1/"]
    assert await store.list_prefixes("vm0/") == [f"vm0/backup{i}/" for i in (0, 2, 4, 6)]
    await store.delete_many([*keys[:5], "never/was"])  # an absent key is no error
    assert [o.key async for o in store.list_objects("")] == sorted(keys[5:])


async def test_read_into_a_buffer(store: ObjectStore) -> None:
    data = bytes(range(256)) * (12 * 1024 + 7)  # 3 MiB and a bit
    await store.put("disk.qcow2", data)
    buf = bytearray(1 * MiB)
    for offset in (0, 65536, len(data) - len(buf)):
        await store.read_into("disk.qcow2", offset, memoryview(buf))
        assert buf == data[offset : offset + len(buf)]
    part = memoryview(buf)[100:612]
    await store.read_into("disk.qcow2", 1000, part)
    assert part == data[1000:1512]
    with pytest.raises(StorageError, match="shorter") as short:
        await store.read_into("disk.qcow2", len(data) - 10, memoryview(buf))
    one_line(short.value)
    with pytest.raises(StorageError) as beyond:
        await store.read_into("disk.qcow2", len(data) + 10, memoryview(buf))
    assert beyond.value.code == "InvalidRange" and "disk.qcow2" in one_line(beyond.value)
    with pytest.raises(ObjectNotFound, match="no such object"):
        await store.read_into("absent", 0, memoryview(buf))


async def test_head_tells_a_missing_object_from_a_missing_bucket(
    s3server: SwiftS3Server, store: ObjectStore
) -> None:
    with pytest.raises(ObjectNotFound) as missing:
        await store.head("absent/manifest.json")
    assert "absent/manifest.json" in one_line(missing.value)
    async with ObjectStore(settings_for(s3server.endpoint()), "no-such-bucket-here") as other:
        with pytest.raises(BucketNotFound) as no_bucket:
            await other.head("manifest.json")
    assert one_line(no_bucket.value).startswith("bucket 'no-such-bucket-here' does not exist")


async def test_multipart_parts_in_any_order(store: ObjectStore) -> None:
    parts = {1: b"\x01" * (5 * MiB), 2: b"\x02" * (5 * MiB + 3), 3: b"tail"}
    started = datetime.now(UTC) - timedelta(seconds=5)
    upload = await store.create_multipart("vm/b1/vda.qcow2")
    etags = {}
    for number in (3, 1, 2):  # the last first, the first last but one
        etags[number] = await store.upload_part("vm/b1/vda.qcow2", upload, number, parts[number])
    pending = await store.pending_uploads("vm/")
    assert [(p.key, p.upload_id) for p in pending] == [("vm/b1/vda.qcow2", upload)]
    assert started <= pending[0].initiated <= datetime.now(UTC) + timedelta(seconds=5)
    assert await store.pending_uploads("other/") == []
    etag = await store.complete_multipart("vm/b1/vda.qcow2", upload, etags)
    assert etag.endswith("-3")
    assert await store.get("vm/b1/vda.qcow2") == parts[1] + parts[2] + parts[3]
    assert (await store.head("vm/b1/vda.qcow2")).size == 10 * MiB + 7
    assert await store.pending_uploads("") == []


async def test_abort_leaves_nothing(store: ObjectStore) -> None:
    upload = await store.create_multipart("vm/b2/vda.qcow2")
    await store.upload_part("vm/b2/vda.qcow2", upload, 1, bytes(5 * MiB))
    await store.abort_multipart("vm/b2/vda.qcow2", upload)
    await store.abort_multipart("vm/b2/vda.qcow2", upload)  # twice is no error
    assert await store.pending_uploads("") == []
    assert [o async for o in store.list_objects("")] == []
    with pytest.raises(ObjectNotFound, match="no such multipart upload"):
        await store.upload_part("vm/b2/vda.qcow2", upload, 2, b"late")


async def test_conditional_put_is_reported_unsupported_by_swift(store: ObjectStore) -> None:
    assert await store.probe_conditional_put(".probe") is ConditionalPut.UNSUPPORTED
    assert [o async for o in store.list_objects("")] == []
    with pytest.raises(StorageUnsupported) as refused:
        await store.put("vm/.lock", b"me", if_absent=True)
    assert "not supported" in one_line(refused.value)


async def test_bad_credentials_name_the_key_never_the_secret(
    s3server: SwiftS3Server, s3bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # botocore's own debug lines included
    wrong = "Wr0ngSecretThatMustNeverBeShown"
    settings = settings_for(s3server.endpoint(), secret_access_key=wrong)
    assert wrong not in repr(settings) and wrong not in str(settings)
    async with ObjectStore(settings, s3bucket, backoff=FAST) as client:
        with pytest.raises(StorageAuthError) as refused:
            await client.put("x", b"data")
    text = one_line(refused.value)
    assert "SignatureDoesNotMatch" in text and repr(s3server.access_key_id) in text
    for secret in (wrong, s3server.secret_access_key):
        assert secret not in text and secret not in caplog.text
    unknown = settings_for(s3server.endpoint(), access_key_id="backupd:nobody")
    async with ObjectStore(unknown, s3bucket, backoff=FAST) as client:
        with pytest.raises(StorageAuthError, match="access key 'backupd:nobody'"):
            await client.get(
                "x"
            )  # Swift's tempauth: SignatureDoesNotMatch, AWS: InvalidAccessKeyId
    assert s3server.secret_access_key not in caplog.text


async def test_denied_missing_bucket_and_quota_errors(
    s3server: SwiftS3Server, s3bucket: str
) -> None:
    async with ObjectStore(settings_for(s3server.endpoint(s3server.reader)), s3bucket) as reader:
        with pytest.raises(StorageAccessDenied) as denied:
            await reader.put("x", b"data")
    assert "AccessDenied" in one_line(denied.value)
    async with ObjectStore(settings_for(s3server.endpoint()), "missing-bucket-x") as client:
        with pytest.raises(BucketNotFound) as missing:
            await client.put("x", b"data")
    assert one_line(missing.value) == (
        f"bucket 'missing-bucket-x' does not exist at {s3server.endpoint_url}"
    )
    s3server.set_bucket_quota(s3bucket, 1 * MiB)
    async with ObjectStore(settings_for(s3server.endpoint()), s3bucket) as client:
        with pytest.raises(StorageQuotaError) as full:
            await client.put("big", bytes(2 * MiB))
    assert "EntityTooLarge" in one_line(full.value)


async def test_unreachable_endpoint_after_bounded_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = S3Endpoint(f"http://127.0.0.1:{free_port()}", "us-east-1", "a:b", "SecretOfTheDead")
    caplog.set_level(logging.DEBUG)
    async with ObjectStore(settings_for(dead), "bucket", backoff=FAST) as client:
        with pytest.raises(StorageUnreachable) as down:
            await client.head("x")
    assert one_line(down.value) == (
        f"S3 endpoint {dead.endpoint_url} is unreachable after 3 attempts: could not connect "
        "(HEAD s3://bucket/x)"
    )
    assert caplog.text.count("HEAD s3://bucket/x failed (EndpointConnectionError)") == 2
    assert "SecretOfTheDead" not in caplog.text


async def test_credentials_from_environment_and_files(
    s3server: SwiftS3Server,
    s3bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a metadata service
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    anonymous = S3Settings(endpoint_url=s3server.endpoint_url, region="us-east-1")
    async with ObjectStore(anonymous, s3bucket, backoff=FAST) as client:
        with pytest.raises(StorageAuthError, match=r"^no S3 credentials found"):
            await client.put("x", b"1")
    (tmp_path / "credentials").write_text(
        f"[default]\naws_access_key_id = {s3server.access_key_id}\n"
        f"aws_secret_access_key = {s3server.secret_access_key}\n"
    )
    async with ObjectStore(anonymous, s3bucket) as client:
        await client.put("from-file", b"1")
    (tmp_path / "credentials").unlink()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3server.secret_access_key)
    async with ObjectStore(anonymous, s3bucket) as client:
        await client.put("from-env", b"2")
        assert [o.key async for o in client.list_objects("from-")] == ["from-env", "from-file"]
