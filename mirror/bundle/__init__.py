"""Offline bundles: signed, verifiable, resumable, delta and split tarballs (``offline-bundle/FORMAT.md``)."""
from mirror.bundle.format import Bundle, Inventory

__all__ = ["Bundle", "Inventory"]
