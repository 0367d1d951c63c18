"""The route table of the registry API; dependencies reach handlers through ``initialize``."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tornado.httputil
import tornado.web

from mirror.api import handlers, ops

NAME = r"(?P<name>[^?#]+?)"
MAX_BUFFERED_BODY = 16 << 10  # bytes of body Tornado reads, before the handler runs, for a route that streams none


@tornado.web.stream_request_body
class TooLargeHandler(handlers.BaseHandler):
    """Any route, for a request that declares a body larger than the route takes: 413 before reading any of it."""

    def prepare(self) -> None:
        """Refuse at once, before the route's access check: nothing of the body is read."""
        raise tornado.web.HTTPError(413, reason=f"request body over the {MAX_BUFFERED_BODY} byte limit of this route")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The spec's JSON error; the body is left unread, so Tornado closes the connection after it."""
        self.set_header("Connection", "close")
        super().write_error(status_code, **kwargs)


class Application(tornado.web.Application):
    """Tornado's application, bounding the body of every request by its route before any of it is read.

    Tornado reads the whole body of a route that does not stream it (``stream_request_body``) before the handler,
    and so the access check, runs: such routes take none beyond MAX_BUFFERED_BODY, whoever sends it. The routes
    that take a body stream it (uploads to disk, manifests up to their size limit) after ``prepare`` checked
    access, within the server's ``max_body_size``.
    """

    def get_handler_delegate(self, request: tornado.httputil.HTTPServerRequest,
                             target_class: type[tornado.web.RequestHandler],
                             target_kwargs: dict[str, Any] | None = None, path_args: list[bytes] | None = None,
                             path_kwargs: dict[str, bytes] | None = None) -> tornado.httputil.HTTPMessageDelegate:
        """The delegate serving ``request``; for a route that does not stream its body, Tornado stops reading one
        past MAX_BUFFERED_BODY (a chunked body: 400 and the connection closed), and a larger declared one is
        answered by TooLargeHandler."""
        if not getattr(target_class, "_stream_request_body", False):  # set by @tornado.web.stream_request_body
            request.connection.set_max_body_size(MAX_BUFFERED_BODY)
            length = request.headers.get("Content-Length", "")
            if length.isascii() and length.isdigit() and (len(length) > 9 or int(length) > MAX_BUFFERED_BODY):
                target_class = TooLargeHandler
        return super().get_handler_delegate(request, target_class, target_kwargs, path_args, path_kwargs)


def make_app(dependencies: dict[str, Any],
             log_function: Callable[[tornado.web.RequestHandler], None] | None = None) -> tornado.web.Application:
    """The Tornado application serving the Distribution API with ``dependencies`` (registry, cache, ...);
    ``log_function`` is told of every finished request (instead of Tornado's access log).

    Every route shares the one ``dependencies`` dict and handlers read it when they are created, so a config
    reload that updates it in place reaches every later request, also on connections already open.
    """
    routes = [
        (r"/v2/?", handlers.PingHandler),
        (r"/token", handlers.TokenHandler),
        (r"/v2/_catalog", handlers.CatalogHandler),
        (rf"/v2/{NAME}/tags/list", handlers.TagsHandler),
        (rf"/v2/{NAME}/manifests/(?P<reference>[^/]+)", handlers.ManifestHandler),
        (rf"/v2/{NAME}/blobs/uploads/?", handlers.UploadHandler),
        (rf"/v2/{NAME}/blobs/uploads/(?P<session>[^/]+)", handlers.UploadHandler),
        (rf"/v2/{NAME}/blobs/(?P<digest>[^/]+)", handlers.BlobHandler),
        (rf"/v2/{NAME}/referrers/(?P<digest>[^/]+)", handlers.ReferrersHandler),
        (r"/metrics", ops.MetricsHandler),
        (r"/healthz", ops.HealthHandler),
        (r"/readyz", ops.ReadyHandler),
    ]
    return Application(
        [(pattern, handler, dependencies) for pattern, handler in routes],
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args=dependencies,
        compress_response=False,
        **({"log_function": log_function} if log_function else {}),
    )
