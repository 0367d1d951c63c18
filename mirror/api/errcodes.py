"""The registry of Distribution-spec error codes, and the single place where errors become JSON."""
from __future__ import annotations

import json

from mirror import errors

# Domain exception -> (spec error code, HTTP status). The most specific class listed wins.
CODES: dict[type[errors.MirrorError], tuple[str, int]] = {
    errors.NameInvalid: ("NAME_INVALID", 400),
    errors.NameUnknown: ("NAME_UNKNOWN", 404),
    errors.DigestInvalid: ("DIGEST_INVALID", 400),
    errors.TagInvalid: ("TAG_INVALID", 400),
    errors.BlobUnknown: ("BLOB_UNKNOWN", 404),
    errors.BlobUploadUnknown: ("BLOB_UPLOAD_UNKNOWN", 404),
    errors.BlobUploadInvalid: ("BLOB_UPLOAD_INVALID", 400),
    errors.RangeInvalid: ("RANGE_INVALID", 416),
    errors.ManifestUnknown: ("MANIFEST_UNKNOWN", 404),
    errors.ManifestInvalid: ("MANIFEST_INVALID", 400),
    errors.ManifestBlobUnknown: ("MANIFEST_BLOB_UNKNOWN", 400),
    errors.ManifestTooLarge: ("SIZE_INVALID", 413),
    errors.PaginationInvalid: ("PAGINATION_NUMBER_INVALID", 400),
    errors.Unsupported: ("UNSUPPORTED", 405),
    errors.Unauthorized: ("UNAUTHORIZED", 401),
    errors.Denied: ("DENIED", 403),
    errors.SignatureRequired: ("DENIED", 403),
    errors.TooManyRequests: ("TOOMANYREQUESTS", 429),
    errors.DirectoryUnavailable: ("UNAVAILABLE", 503),
    errors.StoreFull: ("UNKNOWN", 507),
    errors.StorageUnavailable: ("UNAVAILABLE", 503),
    errors.StorageError: ("UNKNOWN", 500),
    errors.UpstreamUnavailable: ("UNAVAILABLE", 503),
    errors.UpstreamNotFound: ("NAME_UNKNOWN", 404),
    errors.UpstreamDenied: ("DENIED", 403),
    errors.UpstreamInvalid: ("UNKNOWN", 502),
}

# Codes for statuses Tornado raises on its own (unknown route, wrong method, unparsable request).
STATUS_CODES = {404: "NOT_FOUND", 405: "UNSUPPORTED", 400: "UNSUPPORTED", 413: "SIZE_INVALID"}


def lookup(error: errors.MirrorError) -> tuple[str, int]:
    """The spec code and HTTP status of ``error``."""
    for cls in type(error).__mro__:
        if cls in CODES:
            return CODES[cls]
    return "UNKNOWN", 500


def body(code: str, message: str, detail: object = None) -> bytes:
    """The spec's JSON error document for one error."""
    return json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]}).encode()
