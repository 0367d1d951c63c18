"""The store, opened by ``connect`` (as configured) or ``open`` (on local disk): blob bytes, repository metadata,
pins, access index, import staging, queues."""
from mirror.storage.base import BlobStore, BlobWriter
from mirror.storage.store import Store, StoreStats, connect, exists, found, location, open

__all__ = ["BlobStore", "BlobWriter", "Store", "StoreStats", "connect", "exists", "found", "location", "open"]
