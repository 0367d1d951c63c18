"""The route table of the registry API; dependencies reach handlers through ``initialize``."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tornado.web

from mirror.api import handlers, ops

NAME = r"(?P<name>[^?#]+?)"


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
    return tornado.web.Application(
        [(pattern, handler, dependencies) for pattern, handler in routes],
        default_handler_class=handlers.NotFoundHandler,
        default_handler_args=dependencies,
        compress_response=False,
        **({"log_function": log_function} if log_function else {}),
    )
