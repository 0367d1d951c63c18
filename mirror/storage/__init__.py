"""Content-addressed blob store and repository metadata on the local file system."""
from mirror.storage.base import BlobStore, BlobWriter
from mirror.storage.filesystem import FilesystemBlobStore
from mirror.storage.metadata import Metadata

__all__ = ["BlobStore", "BlobWriter", "FilesystemBlobStore", "Metadata"]
