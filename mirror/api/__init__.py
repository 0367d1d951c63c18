"""The registry HTTP API v2 on Tornado."""
from mirror.api.app import make_app

__all__ = ["make_app"]
