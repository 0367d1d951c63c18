"""Clients of upstream registries: manifests and streamed blobs over httpx, with registry auth."""
from mirror.upstream.client import BlobStream, UpstreamClient

__all__ = ["BlobStream", "UpstreamClient"]
