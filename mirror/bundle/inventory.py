"""``mirror inventory``: what the store holds, written as the base of the next delta export."""
from __future__ import annotations

import sys
from pathlib import Path

from mirror import storage
from mirror.bundle.format import Inventory, timestamp
from mirror.config import Config


def run(config: Config, output: str) -> int:
    """Write every blob digest of the store of ``config`` to ``output``; return the exit status."""
    root = config.storage.root
    if not storage.exists(root):
        print(f"mirror: the store {root} does not exist", file=sys.stderr)
        return 1
    blobs = tuple(sorted(storage.open(root).blobs.iter(), key=str))
    Path(output).write_bytes(Inventory(timestamp(), blobs).to_json())
    print(f"wrote {output}: {len(blobs)} blobs")
    return 0
