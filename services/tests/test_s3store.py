"""How S3 failures are sorted: transient (retry), blocked (retry, needs a human), refused (set
the message aside). A wrong answer here either stalls the writer or sets good faces aside."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError as BotoClientError
from botocore.exceptions import (
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from facepipe.s3store import BLOCKED, REFUSED, TRANSIENT, classify


def client_error(code: str, status: int) -> BotoClientError:
    return BotoClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("SlowDown", 503, TRANSIENT),
        ("ServiceUnavailable", 503, TRANSIENT),
        ("InternalError", 500, TRANSIENT),
        ("RequestTimeout", 400, TRANSIENT),
        ("ExpiredToken", 400, TRANSIENT),
        ("OperationAborted", 409, TRANSIENT),
        ("TooManyRequests", 429, TRANSIENT),
        ("NoSuchBucket", 404, BLOCKED),
        ("AccessDenied", 403, BLOCKED),
        ("InvalidAccessKeyId", 403, BLOCKED),
        ("SignatureDoesNotMatch", 403, BLOCKED),
        ("PermanentRedirect", 301, BLOCKED),
        ("RequestTimeTooSkewed", 403, BLOCKED),
        ("KMS.DisabledException", 400, BLOCKED),
        ("MetadataTooLarge", 400, REFUSED),
        ("InvalidArgument", 400, REFUSED),
        ("KeyTooLongError", 400, REFUSED),
        ("EntityTooLarge", 400, REFUSED),
        ("InvalidDigest", 400, REFUSED),
        ("SomethingNew", 400, REFUSED),
        ("NotImplemented", 501, REFUSED),
        ("PreconditionFailed", 412, REFUSED),
    ],
)
def test_s3_answers(code, status, kind):
    assert classify(client_error(code, status)).kind == kind


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (EndpointConnectionError(endpoint_url="http://x"), TRANSIENT),
        (ConnectTimeoutError(endpoint_url="http://x"), TRANSIENT),
        (ReadTimeoutError(endpoint_url="http://x"), TRANSIENT),
        (NoCredentialsError(), BLOCKED),
        (ParamValidationError(report="Non ascii characters found in S3 metadata"), REFUSED),
        (HTTPClientError(error=ValueError("Invalid header value b'a\\r\\nb'")), REFUSED),
        (HTTPClientError(error=ConnectionResetError()), TRANSIENT),
        (RuntimeError("something unknown"), TRANSIENT),
    ],
)
def test_client_side_failures(exc, kind):
    assert classify(exc).kind == kind


def test_descriptions_are_safe_to_log():
    failure = classify(client_error("InvalidArgument", 400))
    text = classify(HTTPClientError(error=ValueError("a\r\n" * 1000))).describe()
    assert failure.describe().startswith("refused S3 error InvalidArgument")
    assert len(text) <= 300 and text.isprintable()
