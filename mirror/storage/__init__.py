"""The store: content-addressed blob bytes, repository metadata, pins and the access index, opened by ``open``."""
from mirror.storage.base import BlobStore, BlobWriter
from mirror.storage.store import Store, exists, open

__all__ = ["BlobStore", "BlobWriter", "Store", "exists", "open"]
