"""The ``mirror`` command line: parses subcommands and hands them to the modules that do the work."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mirror import config as config_module
from mirror.errors import ConfigError, MirrorError

DESCRIPTION = """\
A container image registry appliance: a pull-through cache of upstream registries for docker, containerd and
podman hosts, a registry you can push to, and signed offline bundles that carry images across an air gap.

Commands that use the store read a YAML config: --config FILE, else the file $MIRROR_CONFIG names, else the
built-in defaults (listen on 0.0.0.0:5000, store in ./mirror-data, Docker Hub as the upstream); bundle import
needs a config (or --default-store). See README.md.
Run "mirror COMMAND --help" for a command's options."""
CONFIG_HELP = "the YAML config (default: the file $MIRROR_CONFIG names, else the built-in defaults)"


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

    configured = args.config or os.environ.get("MIRROR_CONFIG")
    if args.default_store and configured:
        print(f"mirror bundle import: --default-store goes without a config file, and {configured} is given: "
              "drop --default-store to import into the store that config names", file=sys.stderr)
        return 2
    if not configured and not args.default_store:
        print("mirror bundle import: which store? Name its config (the service's: --config /etc/mirror/config.yaml, "
              f"or $MIRROR_CONFIG), or give --default-store to import into ./{config_module.DEFAULT_ROOT}",
              file=sys.stderr)
        return 2
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


def _verify_signatures(args: argparse.Namespace) -> int:
    from mirror import signatures

    config = _config(args)
    result = signatures.run(config, args.image)
    print(f"{result.image}: {result.repository}@{result.digest}")
    for found in result.signatures:
        verdict = f"verified, signed by {found.key}" if found.key else f"not valid: {found.problem}"
        print(f"{found.format} signature {found.source}: {verdict}")
    if not result.signatures:
        print("no signatures found")
    decision = result.decision
    rule = f"rule {decision.rule!r}" if decision.rule else "no rule (nothing required)"
    if decision.allowed:
        signed = f": signed by {', '.join(decision.by)}" if decision.by else ""
        print(f"allowed by {rule}{signed} (signatures.mode: {config.signatures.mode})")
        return 0
    print(f"refused by {rule}: missing a valid signature by {' or '.join(decision.missing)} "
          f"(signatures.mode: {config.signatures.mode})")
    return 1


def _gc(args: argparse.Namespace) -> int:
    from mirror import gc

    return gc.run(_config(args), dry_run=args.dry_run, untagged=args.untagged)


def _cache_purge(args: argparse.Namespace) -> int:
    from mirror import purge

    if not args.refs and args.older_than is None:
        print("mirror cache purge: name images, or give --older-than", file=sys.stderr)
        return 2
    older_than = None if args.older_than is None else config_module.parse_duration(args.older_than, "--older-than")
    results = purge.run(_config(args), args.refs, older_than)
    for result in results:
        count = f"{len(result.manifests)} manifest{'' if len(result.manifests) == 1 else 's'}"
        if result.error is not None:
            print(f"failed {result.reference}: {result.error}")
        elif result.reference is None:
            print(f"purged {count} of {result.repository} not used for {args.older_than}")
        else:
            print(f"purged {result.reference}: {count} from {result.repository}")
    if args.older_than is not None and not any(result.reference is None for result in results):
        print(f"no cached image unused for {args.older_than}")
    if any(result.manifests for result in results):
        print("their blobs are freed by the next mirror gc")
    return 1 if any(result.error for result in results) else 0


def _tls_init(args: argparse.Namespace) -> int:
    from mirror import tls

    return tls.init(args.dir, args.hostname, args.ip, replace_names=args.replace_names)


def _version() -> str:
    """The version of the installed ``mirror`` distribution, or ``unknown`` when it is not installed."""
    try:
        return importlib.metadata.version("mirror")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="mirror", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mirror {_version()}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str,
                parent: argparse._SubParsersAction = commands, config: bool = True,
                config_help: str = CONFIG_HELP) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, description=help)
        if config:
            sub.add_argument("--config", metavar="FILE", help=config_help)
        sub.set_defaults(run=run)
        return sub

    command("serve", _serve, "serve the registry API, the pull-through cache, /metrics, /healthz and /readyz "
                             "on the config's listen address (SIGHUP rereads the config)")

    bundle_help = "offline bundles: signed image archives that carry images across an air gap"
    bundle = commands.add_parser("bundle", help=bundle_help, description=bundle_help).add_subparsers(
        dest="bundle_command", required=True, title="commands", metavar="COMMAND")
    keygen = command("keygen", _keygen, "write an Ed25519 key pair to sign bundles with", bundle, config=False)
    keygen.add_argument("keyfile", metavar="KEYFILE", help="the private key to write (mode 0600, never overwritten); "
                                                           "the public key goes to KEYFILE.pub")
    export = command("export", _export, "export images (from the upstreams, else the store) into a bundle", bundle)
    export.add_argument("--output", required=True, metavar="OUT.tar", help="the bundle to write (required)")
    export.add_argument("--sign-key", metavar="KEYFILE", help="sign with this private key (default: unsigned)")
    export.add_argument("--platform", action="append", default=[], metavar="os/arch[/variant]",
                        help="keep only this platform of multi-platform images; repeatable (default: all)")
    export.add_argument("--base", metavar="OLD.tar|OLD-bundle.json|inventory.json",
                        help="leave out the blobs the target already has: the previous bundle, its bundle.json or "
                             "the target's `mirror inventory` (default: a full bundle)")
    export.add_argument("--split", metavar="SIZE", help="write parts OUT.tar.000, OUT.tar.001, ... of at most SIZE "
                                                        "bytes each, e.g. 4GiB (default: one file)")
    export.add_argument("--images", metavar="LIST.yaml",
                        help="a YAML list of image references (or a mapping with an images: list), besides REFs")
    export.add_argument("refs", nargs="*", metavar="REF", help="an image reference: alpine:3.20, "
                                                               "ghcr.io/org/app@sha256:..., team/app:1")
    bundle_arguments = ("the bundle (for OUT.tar, the parts OUT.tar.000, OUT.tar.001, ... are found)",
                        "the next parts of a split bundle, in order")
    verify = command("verify", _verify, "check a bundle's signature, every blob and every image; exit 1 on any "
                                        "problem", bundle, config=False)
    verify.add_argument("--trust", action="append", default=[], metavar="PUBFILE",
                        help="require a signature by this public key; repeatable (default: report the signature "
                             "without checking it)")
    verify.add_argument("bundle", metavar="BUNDLE", help=bundle_arguments[0])
    verify.add_argument("parts", nargs="*", metavar="PART", help=bundle_arguments[1])
    importer = command("import", _import, "verify a bundle and import its images into the store, all or nothing",
                       bundle, config_help="the config of the store to import into (default: the file "
                                           "$MIRROR_CONFIG names; one of them, or --default-store, is required)")
    importer.add_argument("--default-store", action="store_true",
                          help=f"without a config file, import into the default store ./{config_module.DEFAULT_ROOT}")
    importer.add_argument("--trust", action="append", default=[], metavar="PUBFILE",
                          help="require a signature by this public key; repeatable, adds to the config's "
                               "trusted_keys (default: those only; with none, any bundle is accepted)")
    importer.add_argument("bundle", metavar="BUNDLE", help=bundle_arguments[0])
    importer.add_argument("parts", nargs="*", metavar="PART", help=bundle_arguments[1])

    inventory = command("inventory", _inventory, "write the digests the store holds, the --base of the next "
                                                 "delta bundle for it")
    inventory.add_argument("--output", required=True, metavar="inventory.json", help="the file to write (required)")

    prefetch = command("prefetch", _prefetch, "warm the pull-through cache with images (every platform of an index)")
    prefetch.add_argument("--list", metavar="FILE", help="a file with one image reference a line, besides IMAGEs")
    prefetch.add_argument("images", nargs="*", metavar="IMAGE",
                          help="an image reference, resolved as the server resolves names (alpine, ghcr.io/org/app:1)")

    verify_signatures = command("verify", _verify_signatures, "check an image's signatures (cosign and Sigstore "
                                "bundles) against the config's signatures policy; exit 1 when it refuses the image")
    verify_signatures.add_argument("image", metavar="IMAGE", help="an image reference, resolved as the server "
                                                                  "resolves names (alpine:3.20, team/app@sha256:...)")

    gc = command("gc", _gc, "remove unreferenced blobs, expired uploads and abandoned import staging")
    gc.add_argument("--dry-run", action="store_true", help="report what would be freed, change nothing")
    gc.add_argument("--untagged", action="store_true", help="also remove manifests no tag reaches "
                                                            "(default: keep every manifest)")

    cache_help = "the pull-through cache's content"
    cache = commands.add_parser("cache", help=cache_help, description=cache_help).add_subparsers(
        dest="cache_command", required=True, title="commands", metavar="COMMAND")
    purge = command("purge", _cache_purge, "remove cached images (never pushed or imported ones); their blobs go at "
                                           "the next gc", cache)
    purge.add_argument("--older-than", metavar="DURATION",
                       help="also purge every cached image not used for DURATION (seconds, or ms/s/m/h/d: 30d)")
    purge.add_argument("refs", nargs="*", metavar="REF",
                       help="a cached image, resolved as the server resolves names (alpine:3.20, "
                            "ghcr.io/org/app@sha256:...): every platform of an index")

    tls_help = "TLS for isolated networks: a private CA and the server's certificate"
    tls = commands.add_parser("tls", help=tls_help, description=tls_help).add_subparsers(
        dest="tls_command", required=True, title="commands", metavar="COMMAND")
    init = command("init", _tls_init, "make a private CA (or reuse the one in DIR) and issue a server certificate "
                                      "for the names given and, on a re-run, the earlier certificate's", tls,
                   config=False)
    init.add_argument("--dir", required=True, help="where to write ca.crt, ca.key, server.crt and server.key "
                                                   "(required)")
    init.add_argument("--hostname", action="append", default=[], metavar="NAME",
                      help="a host name (or address) clients reach the mirror by; repeatable; the first is the "
                           "certificate's subject (a new certificate needs a --hostname or an --ip)")
    init.add_argument("--ip", action="append", default=[], metavar="ADDR",
                      help="an IP address clients reach the mirror by; repeatable")
    init.add_argument("--replace-names", action="store_true",
                      help="certify only the names given (default: keep the names of the server certificate in DIR)")
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
