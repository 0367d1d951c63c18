"""Domain exceptions of the appliance; none of them knows HTTP (see ``api/errcodes.py`` for that).

    MirrorError
    ├── ConfigError                  a configuration key is missing or wrong
    ├── RegistryError                something a registry client asked for is wrong or absent
    │   ├── NameInvalid              repository name does not match the spec's grammar
    │   ├── NameUnknown              repository is not known
    │   ├── DigestInvalid            digest is malformed, or content does not match it
    │   ├── TagInvalid               tag does not match the spec's grammar
    │   ├── BlobUnknown              blob is not in the repository
    │   ├── BlobUploadUnknown        upload session does not exist (or expired)
    │   ├── BlobUploadInvalid        upload session cannot take this request
    │   ├── RangeInvalid             chunk does not continue the upload where it stands
    │   ├── ManifestUnknown          manifest (tag or digest) is not in the repository
    │   ├── ManifestInvalid          manifest cannot be parsed or contradicts itself
    │   ├── ManifestBlobUnknown      manifest references content the repository lacks
    │   ├── ManifestTooLarge         manifest is over the size limit
    │   ├── PaginationInvalid        ``n`` or ``last`` cannot be honoured
    │   ├── Unsupported              operation is not offered (e.g. pushing into a mirror)
    │   ├── Unauthorized             caller must authenticate
    │   ├── Denied                   caller may not do this
    │   ├── TooManyRequests          too much work is waiting already: retry shortly
    │   └── DirectoryUnavailable     the LDAP directory that checks passwords is down or too slow
    ├── StorageError                 the store cannot do what was asked
    │   ├── StoreFull                no space left on the device
    │   └── StorageUnavailable       the object storage is unreachable, slow or refused the request
    ├── UpstreamError                an upstream registry failed us
    │   ├── UpstreamUnavailable      unreachable, timed out, 5xx or 429
    │   │   └── FetchAbandoned       the process fetching a blob for us stopped before it was done
    │   ├── UpstreamNotFound         upstream answered 404
    │   ├── UpstreamDenied           upstream refused our credentials
    │   └── UpstreamInvalid          upstream sent content that is not what it claimed
    └── BundleError                  an offline bundle cannot be used
        ├── BundleInvalid            the bundle is malformed, truncated or corrupt
        └── SignatureInvalid         the signature is missing, untrusted or wrong
"""


class MirrorError(Exception):
    """Base of every error the appliance raises on purpose."""

    def __init__(self, message: str = "", detail: object = None):
        super().__init__(message or self.__doc__)
        self.message = message or (self.__doc__ or "").rstrip(".")
        self.detail = detail


class ConfigError(MirrorError):
    """A configuration key is missing or wrong."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"config key {key!r}: {problem}")
        self.key = key


class RegistryError(MirrorError):
    """Something a registry client asked for is wrong or absent."""


class NameInvalid(RegistryError):
    """Invalid repository name."""


class NameUnknown(RegistryError):
    """Repository name not known to registry."""


class DigestInvalid(RegistryError):
    """Provided digest did not match uploaded content."""


class TagInvalid(RegistryError):
    """Invalid tag."""


class BlobUnknown(RegistryError):
    """Blob unknown to registry."""


class BlobUploadUnknown(RegistryError):
    """Blob upload unknown to registry."""


class BlobUploadInvalid(RegistryError):
    """Blob upload invalid."""


class RangeInvalid(RegistryError):
    """Requested range does not continue the upload."""


class ManifestUnknown(RegistryError):
    """Manifest unknown."""


class ManifestInvalid(RegistryError):
    """Manifest invalid."""


class ManifestBlobUnknown(RegistryError):
    """Manifest references a blob unknown to the repository."""


class ManifestTooLarge(RegistryError):
    """Manifest is larger than the registry accepts."""


class PaginationInvalid(RegistryError):
    """Invalid number of results requested."""


class Unsupported(RegistryError):
    """The operation is unsupported."""


class Unauthorized(RegistryError):
    """Authentication required."""


class Denied(RegistryError):
    """Requested access to the resource is denied."""


class SignatureRequired(Denied):
    """The signature policy refuses an image: a rule requires a signature it lacks."""


class StorageError(MirrorError):
    """The store cannot do what was asked."""


class StoreFull(StorageError):
    """No space left in the store."""


class StorageUnavailable(StorageError):
    """The object storage behind the store is unreachable, too slow or refused the request: retry later."""


class UpstreamError(MirrorError):
    """An upstream registry failed us."""


class UpstreamUnavailable(UpstreamError):
    """Upstream registry is unavailable."""


class FetchAbandoned(UpstreamUnavailable):
    """The worker or instance fetching a blob that this request follows stopped before the bytes were verified."""


class UpstreamNotFound(UpstreamError):
    """Upstream registry does not have it."""


class UpstreamDenied(UpstreamError):
    """Upstream registry refused our credentials."""


class UpstreamInvalid(UpstreamError):
    """Upstream registry sent content that is not what it claimed."""


class BundleError(MirrorError):
    """An offline bundle cannot be used."""


class BundleInvalid(BundleError):
    """The bundle is malformed, truncated or corrupt."""


class SignatureInvalid(BundleError):
    """The bundle signature is missing, untrusted or wrong."""


class TooManyRequests(RegistryError):
    """Too much work of this kind is waiting already: the caller should retry shortly."""


class DirectoryUnavailable(RegistryError):
    """The LDAP directory that checks passwords is down or did not answer in time."""
