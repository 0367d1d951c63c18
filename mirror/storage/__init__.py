"""The store, opened by ``open``: blob bytes, repository metadata, pins, access index, import staging, queues."""
from mirror.storage.base import BlobStore, BlobWriter
from mirror.storage.store import Store, StoreStats, exists, open

__all__ = ["BlobStore", "BlobWriter", "Store", "StoreStats", "exists", "open"]
