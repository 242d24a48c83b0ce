"""Explicit credentials for one fetch, instead of the process environment.

A process that fetches for several owners (the adapter loader: one replica, many Adapters, each with its own
`source.credentialsSecretRef`) must not use one set of credentials for all of them. `Credentials` carries the
values of storage.uri.CREDENTIAL_ENV names (HF_TOKEN, AWS_*) for one fetch; the fetchers use them instead of
the environment when given (`fetcher_for(..., credentials=...)`), and never mix the two.

In a replica each referenced Secret is a read-only volume at `ADAPTER_CREDENTIALS_ROOT/<secret>` (one file per
key, as Kubernetes mounts Secrets); `from_secret_dir` reads it the way builders map a Secret onto env vars:
the whole Secret onto every CREDENTIAL_ENV name it has, or one key onto its scheme's TOKEN_ENV. A token is sent
over HTTP(S) only to huggingface.co or to an origin the Secret itself lists in its ORIGINS_KEY key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from loraplane.storage.uri import CREDENTIAL_ENV, ArtifactUri

# A Secret value is a token or key: a few KiB at most. A bigger file is not read (a mounted wrong thing).
_MAX_VALUE_BYTES = 64 * 1024
# The Secret key that lists the origins (`https://host[:port]`, comma- or space-separated) its token may be sent
# to over HTTP(S). Whoever may create an Adapter may name any Secret of the namespace in credentialsSecretRef,
# including one they cannot read; without this binding the loader would send that Secret's value as a Bearer
# token to any https:// host the Adapter names (issue 12 review). Only someone who may write the Secret can add
# the key, so only the Secret's owner decides where its token goes. Tokens for huggingface.co need no entry.
ORIGINS_KEY = "ALLOWED_ORIGINS"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str | None:
    """`scheme://host[:port]` of an http(s) URL: scheme and host lowercased, a trailing dot and the scheme's
    default port dropped (so `HTTPS://Example.com.:443/x` -> `https://example.com`); None for anything else."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS[scheme] else "")


@dataclass(frozen=True)
class Credentials:
    """Credentials for one fetch: `values` by CREDENTIAL_ENV name (only the ones present), and `origin`, what
    messages call them ("Secret hf-token"); never printed with their values (repr hides them)."""

    origin: str
    values: dict[str, str] = field(default_factory=dict, repr=False)
    origins: frozenset[str] = frozenset()   # where a token may be sent over HTTP(S) (ORIGINS_KEY), as origin_of

    def get(self, name: str) -> str | None:
        """The value of one CREDENTIAL_ENV name, or None when these credentials do not have it."""
        return self.values.get(name) or None

    def may_send_to(self, url: str) -> bool:
        """True when the Secret's ORIGINS_KEY lists the origin of `url` (origin_of on both sides)."""
        return (found := origin_of(url)) is not None and found in self.origins

    @classmethod
    def from_secret_dir(cls, directory: Path, secret: str, key: str | None, uri: ArtifactUri) -> "Credentials":
        """The credentials of Secret `secret` mounted at `directory`: with `key`, that one file is the token of
        `uri`'s scheme (uri.token_env); without, every CREDENTIAL_ENV file it has. A missing directory or file
        (the Secret or key does not exist: the volume is optional) gives credentials without those values, so
        the store refuses them and the message names the Secret."""
        origin = f"Secret {secret}" + (f" key {key}" if key else "")
        wanted = {uri.token_env: key} if key else {name: name for name in CREDENTIAL_ENV}
        values: dict[str, str] = {}
        for name, filename in wanted.items():
            if "/" in filename or filename in ("", ".", ".."):
                continue  # a key is a file name in the Secret's volume, never a path out of it
            path = Path(directory) / filename
            try:
                if path.is_file() and path.stat().st_size <= _MAX_VALUE_BYTES:
                    if value := path.read_text().strip():
                        values[name] = value
            except (OSError, UnicodeDecodeError):
                continue
        allowed: frozenset[str] = frozenset()
        try:
            listed = Path(directory) / ORIGINS_KEY
            if listed.is_file() and listed.stat().st_size <= _MAX_VALUE_BYTES:
                allowed = frozenset(o for o in (origin_of(t) for t in listed.read_text().replace(",", " ").split())
                                    if o)
        except (OSError, UnicodeDecodeError):
            pass
        return cls(origin, values, allowed)
