"""``mirror inventory``: what the store holds, written as the base of the next delta export."""
from __future__ import annotations

import sys
from pathlib import Path

from mirror import storage
from mirror.bundle.format import MAX_INVENTORY, Inventory, timestamp
from mirror.config import Config


def run(config: Config, output: str) -> int:
    """Write every blob digest of the store of ``config`` to ``output``; return the exit status."""
    if not storage.found(config):
        print(f"mirror: the store {config.storage.root} does not exist", file=sys.stderr)
        return 1
    blobs = tuple(sorted(storage.connect(config).blobs.iter(), key=str))
    data = Inventory(timestamp(), blobs).to_json()
    if len(data) > MAX_INVENTORY:
        print(f"mirror: an inventory of {len(blobs)} blobs would be {len(data)} bytes, over the {MAX_INVENTORY} byte "
              f"limit of export --base", file=sys.stderr)
        return 1
    Path(output).write_bytes(data)
    print(f"wrote {output}: {len(blobs)} blobs")
    return 0
