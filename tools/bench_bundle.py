"""Bundle export and import throughput, as ratios to copying the same bytes with fsync on the same disk.

    python tools/bench_bundle.py [--size 512MiB] [--rounds 3] [--dir DIR] [--json FILE]

``measure()`` is what ``tools/bench`` calls. Each round exports a store holding one image of ``size`` bytes
of random layers into a bundle, imports that bundle into an empty store, and copies the bundle file with
fsync; the best time of each is kept. A ratio of 1.0 means as fast as the plain copy.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mirror import manifest as manifests  # noqa: E402
from mirror import storage  # noqa: E402
from mirror.bundle import export, importer  # noqa: E402
from mirror.config import Config, Storage, parse_size  # noqa: E402
from mirror.digest import Digest  # noqa: E402
from mirror.registry import Registry  # noqa: E402

LAYER_SIZE = 64 * 1024 * 1024
CHUNK = 1 << 20


def fill_store(root: Path, size: int) -> None:
    """A store holding ``bench.example/image:1``, an image of random layers adding up to ``size`` bytes."""
    registry = Registry(storage.open(root))
    name, layers = "bench.example/image", []
    for start in range(0, size, LAYER_SIZE):
        writer, layer = registry.blobs.writer(), min(LAYER_SIZE, size - start)
        for offset in range(0, layer, CHUNK):
            writer.write(os.urandom(min(CHUNK, layer - offset)))
        digest = writer.commit()
        registry.metadata.link_blob(name, digest)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": str(digest),
                       "size": registry.blobs.stat(digest)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                                                                            "diff_ids": []}}).encode()
    config_digest = Digest.of(config)
    writer = registry.blobs.writer()
    writer.write(config)
    registry.finish_upload(name, writer, config_digest)
    body = json.dumps({"schemaVersion": 2, "mediaType": manifests.OCI_MANIFEST, "layers": layers,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": str(config_digest), "size": len(config)}}).encode()
    registry.put_manifest(name, "1", body, manifests.OCI_MANIFEST)


def copy_with_fsync(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` in 1 MiB chunks and fsync it: the baseline."""
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(CHUNK):
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())


def timed(action: Callable[[], object]) -> float:
    """Seconds ``action`` took, its output silenced."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        action()
    return time.perf_counter() - start


def measure(workdir: Path, size: int = 512 * 1024 * 1024, rounds: int = 3) -> dict[str, float]:
    """Best-of-``rounds`` export, import and fsync'd copy times of a ``size``-byte image, and the ratios."""
    source = workdir / "source"
    fill_store(source, size)
    config = Config(storage=Storage(root=source), upstreams=(), default_upstream=None)
    bundle, target, copy = workdir / "bundle.tar", workdir / "target", workdir / "copy.tar"
    target_config = Config(storage=Storage(root=target), upstreams=(), default_upstream=None)
    best = {"export": float("inf"), "import": float("inf"), "copy": float("inf")}
    for _ in range(rounds):
        bundle.unlink(missing_ok=True)
        best["export"] = min(best["export"], timed(lambda: export.run(config, str(bundle),
                                                                      refs=["bench.example/image:1"])))
        shutil.rmtree(target, ignore_errors=True)
        best["import"] = min(best["import"], timed(lambda: importer.run(target_config, [str(bundle)])))
        best["copy"] = min(best["copy"], timed(lambda: copy_with_fsync(bundle, copy)))
        copy.unlink()
    mib = bundle.stat().st_size / 2**20
    return {"bundle_mib": round(mib, 1),
            **{f"{step}_mib_s": round(mib / seconds, 1) for step, seconds in best.items()},
            "export_ratio": round(best["copy"] / best["export"], 3),
            "import_ratio": round(best["copy"] / best["import"], 3)}


def main() -> int:
    """Run the benchmark and print the table (and write JSON when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512MiB", help="image size (default 512MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="where to work (default: a temporary folder in the current directory)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bundle-", dir=args.dir or ".") as workdir:
        results = measure(Path(workdir), parse_size(args.size, "--size"), args.rounds)
    print(f"bundle of {results['bundle_mib']} MiB, best of {args.rounds}")
    print(f"{'step':<8}{'MiB/s':>10}{'ratio to fsync copy':>22}")
    for step in ("export", "import", "copy"):
        ratio = results.get(f"{step}_ratio", 1.0)
        print(f"{step:<8}{results[f'{step}_mib_s']:>10}{ratio:>22}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
