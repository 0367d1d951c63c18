"""The ``mirror`` command line: parses subcommands and hands them to the modules that do the work."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mirror import config as config_module
from mirror.errors import ConfigError, MirrorError


def _config(args: argparse.Namespace) -> config_module.Config:
    return config_module.load(getattr(args, "config", None), os.environ)


def _serve(args: argparse.Namespace) -> int:
    from mirror import server

    return server.serve(_config(args), config_path=args.config, environ=os.environ)


def _keygen(args: argparse.Namespace) -> int:
    from mirror.bundle import signing

    return signing.keygen(args.keyfile)


def _export(args: argparse.Namespace) -> int:
    from mirror.bundle import export

    return export.run(_config(args), args.output, refs=args.refs, images_file=args.images,
                      sign_key=args.sign_key, platforms=args.platform, base=args.base,
                      split=config_module.parse_size(args.split, "--split") if args.split else None)


def _verify(args: argparse.Namespace) -> int:
    from mirror.bundle import verify

    return verify.run([args.bundle, *args.parts], trust=args.trust)


def _import(args: argparse.Namespace) -> int:
    from mirror.bundle import importer

    return importer.run(_config(args), [args.bundle, *args.parts], trust=args.trust)


def _inventory(args: argparse.Namespace) -> int:
    from mirror.bundle import inventory

    return inventory.run(_config(args), args.output)


def _prefetch(args: argparse.Namespace) -> int:
    from mirror import prefetch

    texts = list(args.images)
    if args.list:
        lines = Path(args.list).read_text().splitlines()
        texts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not texts:
        print("mirror prefetch: no images given", file=sys.stderr)
        return 2

    def report(result: prefetch.Prefetched) -> None:
        if result.error is None:
            print(f"prefetched {result.reference}: {result.blobs} blobs", flush=True)
        else:
            print(f"failed {result.text}: {result.error}", flush=True)

    return 1 if prefetch.run(_config(args), texts, report) else 0


def _gc(args: argparse.Namespace) -> int:
    from mirror import gc

    return gc.run(_config(args), dry_run=args.dry_run, untagged=args.untagged)


def _tls_init(args: argparse.Namespace) -> int:
    from mirror import tls

    return tls.init(args.dir, args.hostname, args.ip)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="mirror", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str,
                parent: argparse._SubParsersAction = commands, config: bool = True) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        if config:
            sub.add_argument("--config", metavar="FILE", help="YAML config (default: $MIRROR_CONFIG or built-in)")
        sub.set_defaults(run=run)
        return sub

    command("serve", _serve, "serve the registry API")

    bundle = commands.add_parser("bundle", help="offline bundles").add_subparsers(dest="bundle_command",
                                                                                 required=True)
    keygen = command("keygen", _keygen, "write an Ed25519 key pair (KEYFILE, KEYFILE.pub)", bundle, config=False)
    keygen.add_argument("keyfile")
    export = command("export", _export, "export images into a bundle", bundle)
    export.add_argument("--output", required=True, metavar="OUT.tar")
    export.add_argument("--sign-key", metavar="KEYFILE")
    export.add_argument("--platform", action="append", default=[], metavar="os/arch")
    export.add_argument("--base", metavar="OLD.tar|OLD-bundle.json|inventory.json")
    export.add_argument("--split", metavar="SIZE")
    export.add_argument("--images", metavar="LIST.yaml")
    export.add_argument("refs", nargs="*", metavar="REF")
    verify = command("verify", _verify, "check a bundle's signature and every blob", bundle, config=False)
    verify.add_argument("--trust", action="append", default=[], metavar="PUBFILE")
    verify.add_argument("bundle")
    verify.add_argument("parts", nargs="*", metavar="PART")
    importer = command("import", _import, "import a bundle into the store", bundle)
    importer.add_argument("--trust", action="append", default=[], metavar="PUBFILE")
    importer.add_argument("bundle")
    importer.add_argument("parts", nargs="*", metavar="PART")

    inventory = command("inventory", _inventory, "write what the store holds, as a base for delta bundles")
    inventory.add_argument("--output", required=True, metavar="inventory.json")

    prefetch = command("prefetch", _prefetch, "warm the pull-through cache")
    prefetch.add_argument("--list", metavar="FILE", help="a file with one image reference a line")
    prefetch.add_argument("images", nargs="*", metavar="IMAGE")

    gc = command("gc", _gc, "remove unreferenced blobs and expired uploads")
    gc.add_argument("--dry-run", action="store_true", help="report what would be freed, change nothing")
    gc.add_argument("--untagged", action="store_true", help="also remove manifests no tag reaches")

    tls = commands.add_parser("tls", help="TLS certificates").add_subparsers(dest="tls_command", required=True)
    init = command("init", _tls_init, "make a private CA and a server certificate", tls, config=False)
    init.add_argument("--dir", required=True)
    init.add_argument("--hostname", required=True)
    init.add_argument("--ip", action="append", default=[], metavar="ADDR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mirror`` command; return its exit status (2 for a config error, 1 for any other error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MirrorError as exc:
        print(f"mirror: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except OSError as exc:  # a file or directory the command needs, such as a storage root that is a file
        reason = exc.strerror or str(exc)
        print(f"mirror: {exc.filename}: {reason}" if exc.filename else f"mirror: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
