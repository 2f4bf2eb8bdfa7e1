"""The S3 side of face-writer: one boto3 client, idempotent PUTs, errors sorted by kind.

Everything S3-specific comes from boto3's standard chain: the endpoint (``AWS_ENDPOINT_URL``),
credentials (environment, ``AWS_SHARED_CREDENTIALS_FILE``, profiles via ``AWS_PROFILE``,
instance roles), the region. Nothing here re-implements any of it.

The store never gives up on a face: callers retry :meth:`S3Store.put_face` forever with the
backoff from :func:`backoff_delay`. Errors are classified only to log them usefully (once per
change of state, not once per retry) and to back off longer when retrying is unlikely to help
soon (a missing bucket or denied access needs a human, but the writer waits for one).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

from facepipe.contract import CONTENT_TYPE

log = logging.getLogger("facepipe.s3")

REJECTED_CONTENT_TYPE: Final = "application/octet-stream"

RETRYABLE: Final = "retryable"
PERMANENT: Final = "permanent"

# Error codes that will not fix themselves by retrying soon: wrong bucket, credentials or policy.
_PERMANENT_CODES: Final = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidBucketName",
        "AccountProblem",
        "InvalidObjectState",
        "ExpiredToken",
        "InvalidToken",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "KMS.DisabledException",
        "KMS.NotFoundException",
    }
)


@dataclass(frozen=True)
class S3Failure:
    """What went wrong with one request: ``kind`` is RETRYABLE or PERMANENT."""

    kind: str
    code: str
    message: str

    def describe(self) -> str:
        return f"{self.kind} S3 error {self.code}: {self.message}"


def classify(exc: BaseException) -> S3Failure:
    """Sort an exception from boto3 into retryable (transient) or permanent (needs a human)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "Unknown")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = str(error.get("Message") or exc)
        if code in _PERMANENT_CODES or status in (401, 403) or (code == "404" and status == 404):
            return S3Failure(PERMANENT, code, message)
        # 5xx, throttling (SlowDown, 503, RequestTimeout ...) and anything unknown: retry.
        return S3Failure(RETRYABLE, code, message)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return S3Failure(PERMANENT, type(exc).__name__, str(exc))
    # Connection errors, other botocore errors and anything unknown: retry.
    return S3Failure(RETRYABLE, type(exc).__name__, str(exc))


def backoff_delay(attempt: int, kind: str, base: float = 0.2, cap: float = 15.0) -> float:
    """Capped exponential backoff with full jitter; permanent errors start slower."""
    start = base * (10 if kind == PERMANENT else 1)
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
            )
            client = boto3.session.Session().client("s3", config=config)
        self.client = client
        self._lock = threading.Lock()
        self._state = "unknown"

    def describe(self) -> str:
        return f"s3://{self.bucket} at {self.client.meta.endpoint_url}"

    def put_face(self, key: str, body: bytes, metadata: Mapping[str, str]) -> None:
        self._put(key, body, metadata, CONTENT_TYPE)

    def put_rejected(self, key: str, body: bytes, metadata: Mapping[str, str]) -> None:
        self._put(key, body, metadata, REJECTED_CONTENT_TYPE)

    def _put(self, key: str, body: bytes, metadata: Mapping[str, str], content_type: str) -> None:
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
            self._set_state(f"{failure.kind} {failure.code}", failure)
            raise
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
        elif failure.kind == PERMANENT:
            log.error(
                "%s: %s; will keep retrying, fix the bucket/credentials/policy",
                self.describe(),
                failure.describe(),
            )
        else:
            log.warning("%s: %s; retrying with backoff", self.describe(), failure.describe())
