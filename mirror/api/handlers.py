"""Thin request handlers of the Distribution API: parse the request, call the registry, shape the response."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import urllib.parse
from typing import Any

import tornado.iostream
import tornado.web

from mirror import errors
from mirror.api import errcodes
from mirror.auth import Auth, Caller
from mirror.digest import Digest
from mirror.events import Content, Events
from mirror.fetch import HOSTED, BlobSource
from mirror.manifest import MAX_MANIFEST_SIZE, OCI_INDEX
from mirror.registry import Page, Registry, StoredManifest, paginate
from mirror.repository import DefaultRoute, Mirrored, Repositories, Repository
from mirror.signatures import Policy
from mirror.storage.base import BlobWriter

log = logging.getLogger("mirror.api")
_BYTE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_UPLOAD_RANGE = re.compile(r"(?:bytes[ =])?(\d+)-(\d+)")
MAX_DIGITS = 18  # longer numbers in Range and Content-Range headers are past any blob (and past int()'s limit)


class BaseHandler(tornado.web.RequestHandler):
    """Common headers, path checks, the request's repository and spec-shaped JSON errors for every route."""

    registry: Registry
    repositories: Repositories
    repository: Repository  # what the route's ``name`` resolved to (routes with a name only)
    bytes_sent = 0  # body bytes written, for the access log and metrics
    cache_result: str | None = None  # where the blob or manifest served came from: hosted, hit or miss
    upstream: str | None = None  # the upstream a blob or manifest served as a hit or a miss is cached from
    error_message: str | None = None  # why the request failed, for the access log

    def initialize(self, registry: Registry, repositories: Repositories, activity: Any = None,
                   auth: Auth | None = None, events: Events | None = None, policy: Policy | None = None,
                   **_: Any) -> None:
        """Receive the application's dependencies and count this request as in flight."""
        self.registry = registry
        self.policy = policy
        self.repositories = repositories
        self.events = events
        self.auth = auth
        self.caller: Caller | None = None
        self.activity = activity
        if activity is not None:
            activity.begin()

    def on_finish(self) -> None:
        """The request is no longer in flight."""
        self._settle()

    def on_connection_close(self) -> None:
        """A client that went away is no longer in flight (and Tornado stops waiting for the rest of its body)."""
        super().on_connection_close()
        self._settle()

    def _settle(self) -> None:
        if self.activity is not None:
            self.activity.end()
            self.activity = None

    def set_default_headers(self) -> None:
        """Every response names the API version."""
        self.set_header("Docker-Distribution-API-Version", "registry/2.0")

    async def prepare(self) -> None:
        """Refuse encoded slashes and dot segments before any routing argument is trusted; resolve the
        repository the request names, once; check access to it."""
        raw_path = self.request.path.lower()
        if "%2f" in raw_path or "%5c" in raw_path or "/../" in raw_path or "/./" in raw_path:
            raise errors.NameInvalid("encoded slashes and dot segments are not allowed in paths")
        name = self.path_kwargs.get("name")
        if name is not None:
            self.repository = self.repositories.resolve(name, self.ns)
        if self.auth is not None:
            authorization = self.request.headers.get("Authorization")
            check = functools.partial(self.auth.authorize, authorization, self.request.method, name,
                                      self.repository if name is not None else None)
            # a password costs a bcrypt check, slow on purpose: on the password threads, a bounded queue
            self.caller = await self.auth.passwords.run(authorization, check)

    def served(self, origin: str) -> None:
        """Note where the blob or manifest served came from, for the access log and metrics: ``origin`` and,
        for a hit or a miss, the upstream of the mirrored repository (behind a default route) that served it."""
        self.cache_result = origin
        mirrored = self.repository.mirrored if isinstance(self.repository, DefaultRoute) else self.repository
        if origin != HOSTED and isinstance(mirrored, Mirrored):
            self.upstream = mirrored.upstream.name

    def may_read(self, repository: Repository | str) -> bool:
        """Whether the caller may pull from ``repository`` (or a store repository's name); anyone may, without
        auth."""
        return self.auth is None or self.auth.may_read(self.caller, repository)

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of a 401: where to get a token for this request."""
        return self.auth.challenge(f"{self.request.protocol}://{self.request.host}", self.request.method,
                                   self.path_kwargs.get("name"))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Write the error as the spec's JSON document."""
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, errors.MirrorError):
            code, status_code = errcodes.lookup(error)
            message, detail = error.message, error.detail
        else:
            code = errcodes.STATUS_CODES.get(status_code, "UNKNOWN")
            message, detail = self._reason, None
        self.set_status(status_code)
        if status_code == 401 and self.auth is not None:
            self.set_header("WWW-Authenticate", self.challenge())
        if status_code in (401, 403) and self.auth is not None and self.caller is None:
            # Refused in prepare, before a streamed body was read: Tornado closes the connection after this
            # answer, so tell the client not to send its next request on it.
            self.set_header("Connection", "close")
        if isinstance(error, errors.TooManyRequests):
            self.set_header("Retry-After", "1")
        if isinstance(error, errors.RangeInvalid) and isinstance(error.detail, dict):
            self.set_header("Range", f"0-{max(error.detail['size'] - 1, 0)}")
        self.set_header("Content-Type", "application/json")
        self.finish(errcodes.body(code, message, detail))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Registry errors are the client's business: the request's access log line tells them, not a crash log."""
        if isinstance(value, errors.MirrorError):
            self.error_message = value.message
        else:
            super().log_exception(typ, value, tb)

    @property
    def ns(self) -> str | None:
        """The upstream registry containerd names with ``?ns=``."""
        return self.get_query_argument("ns", None)

    def location(self, path: str) -> str:
        """``path`` as a ``Location``: with this request's ``?ns=``, so the next request reaches the same
        repository."""
        return f"{path}?{urllib.parse.urlencode({'ns': self.ns})}" if self.ns else path

    def get_current_user(self) -> str | None:
        """The authenticated user's name (Tornado's ``current_user``), None when anonymous."""
        return self.caller.user if self.caller is not None else None

    def write(self, chunk: str | bytes | dict[str, Any]) -> None:
        """Queue ``chunk`` for the client, counting its bytes (handlers write bytes)."""
        super().write(chunk)
        if isinstance(chunk, bytes):
            self.bytes_sent += len(chunk)

    def notify(self, action: str, name: str, reference: str, content: Content | None = None,
               policy: dict[str, Any] | None = None) -> None:
        """Queue the ``action`` event of this request (``policy``: a signature decision) for the notification
        endpoints."""
        if self.events is not None:
            self.events.emit(action, name, reference, content, self.request, self.current_user, policy)

    def write_json(self, document: Any, content_type: str = "application/json") -> None:
        """Finish with a JSON document."""
        self.set_header("Content-Type", content_type)
        self.finish(json.dumps(document).encode())

    def link_next(self, path: str, page: Page, n: str | None) -> None:
        """Add the RFC 5988 ``Link`` header that points at the next page, when there is one."""
        if page.next_last is not None:
            size = f"n={n}&" if n else ""
            self.set_header("Link", f'<{path}?{size}last={page.next_last}>; rel="next"')


class PingHandler(BaseHandler):
    """``/v2/``: the API version check (end-1)."""

    def get(self) -> None:
        """Answer 200 with an empty JSON object."""
        self.write_json({})

    head = get


class CatalogHandler(BaseHandler):
    """``/v2/_catalog``: the repositories, paginated."""

    def get(self) -> None:
        """List one page of repository names."""
        n, last = self.get_query_argument("n", None), self.get_query_argument("last", None)
        page = self.registry.catalog(n, last, self.may_read)
        self.link_next("/v2/_catalog", page, n)
        self.write_json({"repositories": page.items})


class TagsHandler(BaseHandler):
    """``/v2/<name>/tags/list`` (end-8a, end-8b)."""

    async def get(self, name: str) -> None:
        """List one page of the repository's tags."""
        n, last = self.get_query_argument("n", None), self.get_query_argument("last", None)
        page = paginate(await self.repository.tags(), n, last)
        self.link_next(f"/v2/{name}/tags/list", page, n)
        self.write_json({"name": name, "tags": page.items})


class ReferrersHandler(BaseHandler):
    """``/v2/<name>/referrers/<digest>`` (end-12a, end-12b)."""

    async def get(self, name: str, digest: str) -> None:
        """List one page of the manifests whose subject is ``digest``, optionally filtered by artifactType; a
        ``Link`` header names the next page. Pages are read and encoded on a thread (descriptors may be large)."""
        artifact_type = self.get_query_argument("artifactType", None)
        last = self.get_query_argument("last", None)
        referrers = await self.repository.referrers(Digest.parse(digest))
        page = await asyncio.to_thread(referrers.page, artifact_type, last) if referrers else referrers.page()
        if artifact_type:
            self.set_header("OCI-Filters-Applied", "artifactType")
        if page.next_last is not None:
            query = {"ns": self.ns, "artifactType": artifact_type, "last": page.next_last}
            next_page = urllib.parse.urlencode({key: value for key, value in query.items() if value})
            self.set_header("Link", f'</v2/{name}/referrers/{digest}?{next_page}>; rel="next"')
        self.set_header("Content-Type", OCI_INDEX)
        self.finish(page.index())


class BlobHandler(BaseHandler):
    """``/v2/<name>/blobs/<digest>``: GET and HEAD with ranges (end-2), DELETE (end-10)."""

    async def get(self, name: str, digest: str) -> None:
        """Stream the blob, or the requested byte range of it."""
        await self._send(name, Digest.parse(digest), body=True)

    async def head(self, name: str, digest: str) -> None:
        """Describe the blob without its bytes."""
        await self._send(name, Digest.parse(digest), body=False)

    def delete(self, name: str, digest: str) -> None:
        """Remove the blob from the repository."""
        self.repository.delete_blob(Digest.parse(digest))
        self.notify("delete", self.repository.write_name, digest)
        self.set_status(202)
        self.finish()

    async def _send(self, name: str, digest: Digest, body: bool) -> None:
        source = await self.repository.blob(digest)
        self.served(source.origin)
        self.set_header("Docker-Content-Digest", str(digest))
        self.set_header("Accept-Ranges", "bytes")
        self.set_header("ETag", f'"{digest}"')
        self.set_header("Content-Type", "application/octet-stream")
        if body and (url := source.redirect) is not None:
            self.set_status(307)
            self.set_header("Location", url)
            return self.finish()
        byte_range = self._range(source.size)
        if byte_range is None:
            self.set_status(416)
            self.set_header("Content-Range", f"bytes */{source.size}")
            self.set_header("Content-Type", "application/json")
            return self.finish(errcodes.body("RANGE_INVALID", "requested range not satisfiable", {"size": source.size}))
        start, end = byte_range
        if end is not None:
            self.set_header("Content-Length", str(end - start))
        if body:
            await self._stream(source, start, end)
        else:
            self.finish()

    def _range(self, size: int | None) -> tuple[int, int | None] | None:
        """The half-open byte range to send (setting 206 for a Range header), or None when unsatisfiable."""
        match = _BYTE_RANGE.fullmatch(self.request.headers.get("Range", "").strip())
        if size is None or not match or match.groups() == ("", ""):
            return 0, size
        first, last = match.groups()
        if max(len(first), len(last)) > MAX_DIGITS:
            return None
        if first:
            start, end = int(first), min(int(last) + 1 if last else size, size)
        else:
            start, end = max(size - int(last), 0), size
        if start >= end:
            return None
        self.set_status(206)
        self.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        return start, end

    async def _stream(self, source: BlobSource, start: int, end: int | None) -> None:
        """Send the bytes as they come, waiting for the socket between chunks; a source that fails after
        the headers went out cuts the connection, so the client never takes a short body for a whole one."""
        sent = False
        try:
            async with contextlib.aclosing(source.chunks(start, end)) as chunks:
                async for chunk in chunks:
                    self.write(chunk)
                    await self.flush()
                    sent = True
        except tornado.iostream.StreamClosedError:
            return
        except errors.MirrorError as exc:
            if not sent:
                raise
            self.error_message = f"transfer aborted, its source failed: {exc.message}"
            self.request.connection.stream.close()
            return
        self.finish()


@tornado.web.stream_request_body
class UploadHandler(BaseHandler):
    """Blob uploads: POST opens (end-4a/4b, end-11 mount), PATCH appends (end-5), PUT closes (end-6),
    GET reports (end-13), DELETE cancels."""

    writer: BlobWriter | None = None
    failure: errors.MirrorError | None = None

    async def prepare(self) -> None:
        """Open or resume the upload session the request writes into.

        A refusal is kept until the body has been read: answering before that would reset the connection
        under a client still sending, and it would never see the error.
        """
        await super().prepare()
        session = self.path_kwargs.get("session")
        method = self.request.method
        if method in ("GET", "DELETE"):
            return
        try:
            if method == "POST":
                if self._opens_with_body():
                    self.writer = self.repository.start_upload()
            elif session:
                self.writer = self.repository.resume_upload(session)
                self.registry.check_chunk_start(self.writer, self._chunk_start())
            else:
                raise errors.BlobUploadUnknown("the path names no upload session")
        except errors.MirrorError as exc:
            self.writer, self.failure = None, exc

    def _opens_with_body(self) -> bool:
        return self.get_query_argument("digest", None) is not None and not self.get_query_argument("mount", None)

    def _chunk_start(self) -> int | None:
        content_range = self.request.headers.get("Content-Range")
        if not content_range:
            return None
        match = _UPLOAD_RANGE.fullmatch(content_range.strip())
        if not match or max(map(len, match.groups())) > MAX_DIGITS or int(match.group(2)) < int(match.group(1)):
            self.writer.close()
            raise errors.RangeInvalid(f"malformed Content-Range {content_range[:80]!r}",
                                      detail={"size": self.writer.size})
        return int(match.group(1))

    def data_received(self, chunk: bytes) -> None:
        """Append each piece of the body to the session as it arrives."""
        if self.writer is None or self.failure is not None:
            return
        try:
            self.writer.write(chunk)
        except errors.MirrorError as exc:
            self.failure = exc

    def on_connection_close(self) -> None:
        """Keep what arrived of an interrupted chunk; the client may resume from the reported size."""
        if self.writer is not None:
            self.writer.close()
        super().on_connection_close()

    def on_finish(self) -> None:
        """Let the session go whatever became of the request (a writer closed, committed or cancelled is done)."""
        if self.writer is not None:
            self.writer.close()
        super().on_finish()

    async def post(self, name: str, session: None = None) -> None:
        """Mount, take a whole blob in one POST, or open a session."""
        self._raise_failure()
        mount = self.get_query_argument("mount", None)
        if mount and self._mountable(Digest.parse(mount)):
            self.repository.mount(Digest.parse(mount))
            return self._created(name, Digest.parse(mount))
        if self.writer is not None:
            return self._finish_upload(name)
        writer = self.repository.start_upload()
        writer.close()
        self._accepted(name, writer)

    def _mountable(self, digest: Digest) -> bool:
        """Whether the ``from`` repository serves ``digest`` to this caller without asking an upstream."""
        source_name = self.get_query_argument("from", None)
        if not source_name:
            return False
        try:
            source = self.repositories.resolve(source_name, self.ns)
        except errors.NameInvalid:
            return False
        return self.may_read(source) and source.linked_size(digest) is not None

    def patch(self, name: str, session: str | None = None) -> None:
        """Acknowledge an appended chunk."""
        self._raise_failure()
        self.writer.close()
        self._accepted(name, self.writer)

    def put(self, name: str, session: str | None = None) -> None:
        """Close the session: verify the digest and publish the blob."""
        self._finish_upload(name)

    def get(self, name: str, session: str | None = None) -> None:
        """Report how much of the upload has arrived."""
        size = self.repository.upload_size(self._session(session))
        self._session_headers(name, session, size)
        self.set_status(204)
        self.finish()

    def delete(self, name: str, session: str | None = None) -> None:
        """Cancel the upload."""
        self.repository.cancel_upload(self._session(session))
        self.set_status(204)
        self.finish()

    @staticmethod
    def _session(session: str | None) -> str:
        if not session:
            raise errors.BlobUploadUnknown("the path names no upload session")
        return session

    def _finish_upload(self, name: str) -> None:
        self._raise_failure()
        digest_text = self.get_query_argument("digest", None)
        try:
            if digest_text is None:
                raise errors.DigestInvalid("the digest query parameter is required to complete an upload")
            digest = self.repository.finish_upload(self.writer, Digest.parse(digest_text))
        except errors.DigestInvalid:
            self.writer.cancel()
            raise
        self._created(name, digest)

    def _raise_failure(self) -> None:
        if self.failure is not None:
            if self.writer is not None:
                self.writer.cancel()
            raise self.failure

    def _created(self, name: str, digest: Digest) -> None:
        self.set_status(201)
        self.set_header("Location", self.location(f"/v2/{name}/blobs/{digest}"))
        self.set_header("Docker-Content-Digest", str(digest))
        self.set_header("Content-Length", "0")
        self.finish()

    def _accepted(self, name: str, writer: BlobWriter) -> None:
        self._session_headers(name, writer.id, writer.size)
        self.set_status(202)
        self.set_header("Content-Length", "0")
        self.finish()

    def _session_headers(self, name: str, session: str, size: int) -> None:
        self.set_header("Location", self.location(f"/v2/{name}/blobs/uploads/{session}"))
        self.set_header("Range", f"0-{max(size - 1, 0)}")
        self.set_header("Docker-Upload-UUID", session)


@tornado.web.stream_request_body
class ManifestHandler(BaseHandler):
    """``/v2/<name>/manifests/<reference>``: GET/HEAD (end-3), PUT (end-7), DELETE (end-9)."""

    async def prepare(self) -> None:
        """Start collecting the body (an oversized one is read and dropped, then refused)."""
        self.body_parts: list[bytes] = []
        self.body_size = 0
        await super().prepare()

    def data_received(self, chunk: bytes) -> None:
        """Collect the manifest body up to the size limit."""
        self.body_size += len(chunk)
        if self.body_size <= MAX_MANIFEST_SIZE:
            self.body_parts.append(chunk)

    async def get(self, name: str, reference: str) -> None:
        """Return the manifest byte for byte with its media type."""
        await self._send(name, reference, body=True)

    async def head(self, name: str, reference: str) -> None:
        """Describe the manifest without its bytes."""
        await self._send(name, reference, body=False)

    async def _send(self, name: str, reference: str, body: bool) -> None:
        manifest = await self.repository.manifest(reference)
        self.served(manifest.origin)
        if body:
            if self.policy is not None:  # a GET must pass the signature policy; HEAD and pushes need not
                await self._check(reference, manifest)
            self.notify("pull", manifest.repository, reference, manifest)
        self.set_header("Content-Type", manifest.media_type)
        self.set_header("Docker-Content-Digest", str(manifest.digest))
        self.set_header("ETag", f'"{manifest.digest}"')
        self.set_header("Content-Length", str(len(manifest.body)))
        self.finish(manifest.body if body else None)

    async def _check(self, reference: str, manifest: StoredManifest) -> None:
        """Apply the signature policy; a refusal or a warning is also a ``deny`` event."""
        try:
            warning = await self.policy.check(self.repository, reference, manifest)
        except errors.SignatureRequired as exc:
            decision = {key: exc.detail[key] for key in ("mode", "rule", "missing")}
            self.notify("deny", manifest.repository, reference, manifest, policy=decision)
            raise
        if warning is not None:
            self.notify("deny", manifest.repository, reference, manifest, policy=warning)

    async def put(self, name: str, reference: str) -> None:
        """Store a manifest under a tag or its digest."""
        if self.body_size > MAX_MANIFEST_SIZE:
            raise errors.ManifestTooLarge(f"manifest is over the {MAX_MANIFEST_SIZE} byte limit")
        manifest = await self.repository.put_manifest(reference, b"".join(self.body_parts),
                                                      self.request.headers.get("Content-Type"))
        self.notify("push", self.repository.write_name, reference, manifest)
        self.set_status(201)
        self.set_header("Location", self.location(f"/v2/{name}/manifests/{manifest.digest}"))
        self.set_header("Docker-Content-Digest", str(manifest.digest))
        if manifest.subject is not None:
            self.set_header("OCI-Subject", str(manifest.subject))
        self.set_header("Content-Length", "0")
        self.finish()

    def delete(self, name: str, reference: str) -> None:
        """Delete a tag, or a manifest by digest."""
        self.repository.delete_manifest(reference)
        self.notify("delete", self.repository.write_name, reference)
        self.set_status(202)
        self.finish()


class TokenHandler(BaseHandler):
    """``/token``: the token endpoint of the docker login flow (only when auth is configured)."""

    def prepare(self) -> None:
        """Exchanging credentials for a token needs no token: no access check here."""
        if self.auth is None:
            raise tornado.web.HTTPError(404)

    async def get(self) -> None:
        """A token granting what the access rules allow of the requested scopes, for Basic credentials or none."""
        authorization = self.request.headers.get("Authorization")
        caller = await self.auth.passwords.run(authorization, functools.partial(self.auth.login, authorization))
        self.set_header("Cache-Control", "no-store")
        self.write_json(self.auth.token(caller, self.get_query_arguments("scope")))

    def challenge(self) -> str:
        """Ask for Basic credentials."""
        return f'Basic realm="{self.auth.settings.service}"'


class NotFoundHandler(BaseHandler):
    """Any path outside the API."""

    def prepare(self) -> None:
        """Answer 404 in the spec's error form."""
        raise tornado.web.HTTPError(404)
