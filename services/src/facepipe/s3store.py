"""The S3 side of face-writer: one boto3 client, idempotent PUTs, errors sorted by kind.

Everything S3-specific comes from boto3's standard chain: the endpoint (``AWS_ENDPOINT_URL``),
credentials (environment, ``AWS_SHARED_CREDENTIALS_FILE``, profiles via ``AWS_PROFILE``,
instance roles), the region. Nothing here re-implements any of it.

:func:`classify` sorts a failed request into one of three kinds, which decide what the writer
does with the message:

- ``transient``: throttling, 5xx, timeouts, connection errors, credentials being refreshed.
  Retried with backoff; S3 will take the object once it is back.
- ``blocked``: the bucket, the credentials or the policy are wrong (``NoSuchBucket``,
  ``AccessDenied``, ...). Nothing can be stored until a human fixes it: retried forever, more
  slowly, and never blamed on the message.
- ``refused``: S3 answered that it will not take *this* object (``MetadataTooLarge``,
  ``InvalidArgument``, ``KeyTooLongError``, ``EntityTooLarge``, other 4xx; a request botocore
  cannot even form). The writer believes it only when S3 takes another object meanwhile (a store
  that refuses everything, e.g. a header it does not support, is an outage, not bad faces).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import boto3
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from facepipe.contract import CONTENT_TYPE, printable

log = logging.getLogger(__name__)

REJECTED_CONTENT_TYPE: Final = "application/octet-stream"

TRANSIENT: Final = "transient"
BLOCKED: Final = "blocked"
REFUSED: Final = "refused"

# Answers about the bucket, credentials or policy: every object fails alike until fixed.
_BLOCKED_CODES: Final = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidBucketName",
        "AccountProblem",
        "InvalidObjectState",
        "InvalidToken",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "RequestTimeTooSkewed",
        "InvalidStorageClass",
        "InvalidSecurity",
        "NotSignedUp",
        "UnauthorizedAccess",
        "MissingSecurityHeader",
    }
)
# Answers worth retrying although some come with a 4xx status.
_TRANSIENT_CODES: Final = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "ExpiredToken",  # temporary credentials being refreshed
        "TokenRefreshRequired",
        "OperationAborted",  # a conflicting operation on the bucket is in progress
        "InternalError",
        "ServiceUnavailable",
        # The body arrived damaged or cut short (a dropped connection): sending it again helps.
        "BadDigest",
        "IncompleteBody",
        "XAmzContentSHA256Mismatch",
        "ConditionalRequestConflict",
    }
)


@dataclass(frozen=True)
class S3Failure:
    """What went wrong with one request: ``kind`` is TRANSIENT, BLOCKED or REFUSED."""

    kind: str
    code: str
    message: str

    def describe(self) -> str:
        return printable(f"{self.kind} S3 error {self.code}: {self.message}", 300)


def classify(exc: BaseException) -> S3Failure:
    """Sort an exception from boto3 into transient, blocked (needs a human) or refused."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "Unknown")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = str(error.get("Message") or exc)
        if code == "NotImplemented" or status == 501:  # a header S3 does not implement
            return S3Failure(REFUSED, code, message)
        if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return S3Failure(TRANSIENT, code, message)
        if code in _BLOCKED_CODES or code.startswith("KMS.") or status in (301, 307, 401, 403, 404):
            return S3Failure(BLOCKED, code, message)
        if 400 <= status < 500:
            return S3Failure(REFUSED, code, message)
        return S3Failure(TRANSIENT, code, message)  # no status: a broken answer, try again
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return S3Failure(BLOCKED, type(exc).__name__, str(exc))
    if isinstance(exc, ParamValidationError):  # botocore refuses the request before sending
        return S3Failure(REFUSED, type(exc).__name__, str(exc))
    if isinstance(exc, HTTPClientError) and isinstance(exc.kwargs.get("error"), ValueError):
        return S3Failure(REFUSED, type(exc).__name__, str(exc))  # e.g. an invalid header value
    if isinstance(exc, ValueError | TypeError):
        return S3Failure(REFUSED, type(exc).__name__, str(exc))
    # Connection errors, timeouts, other botocore errors and anything unknown: retry.
    return S3Failure(TRANSIENT, type(exc).__name__, str(exc))


class S3PutError(Exception):
    """A failed PUT, already classified."""

    def __init__(self, failure: S3Failure) -> None:
        super().__init__(failure.describe())
        self.failure = failure


def backoff_delay(attempt: int, kind: str, base: float = 0.2, cap: float = 15.0) -> float:
    """Capped exponential backoff with full jitter; a blocked S3 is retried more slowly."""
    start = base * (10 if kind == BLOCKED else 1)
    return random.uniform(0, min(cap, start * 2 ** min(attempt, 16)))


class S3Store:
    """Thread-safe PUTs into one bucket (boto3 clients are thread-safe once created)."""

    def __init__(
        self,
        bucket: str,
        *,
        workers: int,
        client: Any | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        self.bucket = bucket
        if client is None:
            config = Config(
                # One pooled connection per upload thread, plus a spare for the rejected path.
                max_pool_connections=max(10, workers + 2),
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                # botocore's own quick retries for 5xx/throttling/connection errors; the
                # writer's loop around them retries forever with longer backoff.
                retries={"mode": "standard", "max_attempts": 3},
                # Checksum headers only where S3 requires them: several S3-compatible stores
                # (Backblaze B2, older MinIO and Ceph) refuse botocore's default CRC32 headers.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            client = boto3.session.Session().client("s3", config=config)
        self.client = client
        self._lock = threading.Lock()
        self._state = "unknown"
        self.last_success = 0.0  # time.monotonic() of the last stored object

    def describe(self) -> str:
        return f"s3://{self.bucket} at {self.client.meta.endpoint_url}"

    def put_face(self, key: str, body: bytes, metadata: Mapping[str, str]) -> None:
        self._put(key, body, metadata, CONTENT_TYPE)

    def put_rejected(self, key: str, body: bytes, metadata: Mapping[str, str]) -> None:
        self._put(key, body, metadata, REJECTED_CONTENT_TYPE)

    def _put(self, key: str, body: bytes, metadata: Mapping[str, str], content_type: str) -> None:
        """One PUT; raises :class:`S3PutError` with the classified failure."""
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=content_type,
                Metadata=dict(metadata),
            )
        except Exception as exc:
            failure = classify(exc)
            if failure.kind != REFUSED:  # a refusal is about one object, not about S3
                self._set_state(f"{failure.kind} {failure.code}", failure)
            raise S3PutError(failure) from exc
        self.last_success = time.monotonic()
        self._set_state("ok", None)

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def _set_state(self, state: str, failure: S3Failure | None) -> None:
        """Log when S3 goes from working to failing (or to another failure) and back."""
        with self._lock:
            previous, self._state = self._state, state
        if state == previous:
            return
        if failure is None:
            if previous != "unknown":
                log.info("%s: storing again (was: %s)", self.describe(), previous)
        elif failure.kind == BLOCKED:
            log.error(
                "%s: %s; will keep retrying, fix the bucket/credentials/policy",
                self.describe(),
                failure.describe(),
            )
        else:
            log.warning("%s: %s; retrying with backoff", self.describe(), failure.describe())
