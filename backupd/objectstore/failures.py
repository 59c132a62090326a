"""What botocore and aiohttp raise, judged (worth another try?) and turned into
backupd's :class:`~backupd.errors.StorageError` tree: one line each, naming the endpoint
or object, the server's error code and what to check.

Messages are built from chosen fields only (error code, HTTP status, the server's
one-line message, the access key *id*), never from a settings object or a request,
so no secret can end up in them.
"""

from __future__ import annotations

import asyncio
import re

import aiohttp
from botocore import exceptions as boto

from backupd.errors import (
    BucketNotFound,
    ObjectNotFound,
    PreconditionFailed,
    StorageAccessDenied,
    StorageAuthError,
    StorageError,
    StorageQuotaError,
    StorageUnreachable,
    StorageUnsupported,
)

#: S3 error codes worth another try (besides every 5xx but 501, and 429)
RETRY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    }
)
AUTH_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
    }
)
DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem"})
QUOTA_CODES = frozenset({"EntityTooLarge", "QuotaExceeded", "InsufficientStorage", "413", "507"})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchUpload", "NotFound", "404"})
PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
UNSUPPORTED_CODES = frozenset({"NotImplemented", "501"})

#: failures on the way (no HTTP answer at all, or a cut body): worth another try
_TRANSIENT = (
    boto.EndpointConnectionError,
    boto.ConnectTimeoutError,
    boto.ReadTimeoutError,
    boto.ConnectionClosedError,
    boto.ResponseStreamingError,
    boto.IncompleteReadError,
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    asyncio.TimeoutError,
    ConnectionError,
)


def client_error(exc: BaseException) -> tuple[str, int | None, str]:
    """(code, HTTP status, server message) of an error the server answered with."""
    if not isinstance(exc, boto.ClientError):
        return "", None, ""
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code", "")), status, one_line(str(error.get("Message", "")))


def one_line(text: str, limit: int = 200) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def retryable(exc: BaseException) -> bool:
    """5xx (but 501), 429, throttling codes, and connections refused, reset, timed out
    or cut mid-body.  TLS failures are not transient (a certificate does not heal)."""
    if isinstance(exc, boto.SSLError):
        return False
    if isinstance(exc, boto.ClientError):
        code, status, _ = client_error(exc)
        if code in RETRY_CODES or status == 429:
            return True
        return status is not None and status >= 500 and status != 501
    return isinstance(exc, _TRANSIENT)


def _reason(exc: BaseException) -> str:
    """Why a request got no answer, in a few words."""
    if isinstance(exc, boto.SSLError):
        return f"TLS failed: {one_line(str(exc.kwargs.get('error', exc)))}"
    if isinstance(exc, boto.EndpointConnectionError | aiohttp.ClientConnectorError):
        return "could not connect"
    if isinstance(exc, boto.ConnectTimeoutError):
        return "connecting timed out"
    if isinstance(exc, boto.ReadTimeoutError | asyncio.TimeoutError):
        return "no answer in time"
    return "the connection broke"


def describe(
    exc: BaseException,
    what: str,
    *,
    endpoint: str,
    bucket: str,
    access_key_id: str | None,
    attempts: int = 1,
) -> StorageError:
    """The StorageError to raise (``from exc``) for ``exc`` met doing ``what``
    (e.g. ``PUT s3://bucket/key``)."""
    if isinstance(exc, StorageError):
        return exc
    who = f"access key {access_key_id!r}" if access_key_id else "the configured credentials"
    if isinstance(exc, boto.NoCredentialsError):
        return StorageAuthError(
            "no S3 credentials found: set s3.access_key_id and s3.secret_access_key, or "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials",
            code="NoCredentials",
        )
    if isinstance(exc, boto.PartialCredentialsError | boto.CredentialRetrievalError):
        return StorageAuthError(f"incomplete S3 credentials: {one_line(str(exc))}", code="Partial")
    if not isinstance(exc, boto.ClientError):
        if isinstance(
            exc, (*_TRANSIENT, boto.SSLError, boto.HTTPClientError, boto.ConnectionError)
        ):
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            return StorageUnreachable(
                f"S3 endpoint {endpoint} is unreachable{tries}: {_reason(exc)} ({what})",
                code=type(exc).__name__,
            )
        return StorageError(f"{what} failed: {type(exc).__name__}", code=type(exc).__name__)
    code, status, message = client_error(exc)
    said = f"{code}: {message}" if message else code
    kind: type[StorageError] = StorageError
    if code in AUTH_CODES:
        kind, text = StorageAuthError, f"{endpoint} refused the credentials of {who} ({said})"
    elif code in DENIED_CODES or (status == 403 and not code.isalpha()):
        kind, text = StorageAccessDenied, f"{what}: access denied to {who} ({said})"
    elif code == "NoSuchBucket":
        kind, text = BucketNotFound, f"bucket {bucket!r} does not exist at {endpoint}"
    elif code == "NoSuchUpload":
        kind, text = ObjectNotFound, f"{what}: no such multipart upload"
    elif code in NOT_FOUND_CODES:
        kind, text = ObjectNotFound, f"{what}: no such object"
    elif code in QUOTA_CODES or status in (413, 507):
        kind, text = StorageQuotaError, f"{what}: refused as too large or over quota ({said})"
    elif code in PRECONDITION_CODES or status == 412:
        kind, text = PreconditionFailed, f"{what}: precondition failed ({said})"
    elif code in UNSUPPORTED_CODES or status == 501:
        kind, text = StorageUnsupported, f"{what}: not supported by {endpoint} ({said})"
    else:
        tries = f" after {attempts} attempts" if attempts > 1 and retryable(exc) else ""
        text = f"{what} failed{tries}: HTTP {status} {said}"
    return kind(text, code=code, status=status)
