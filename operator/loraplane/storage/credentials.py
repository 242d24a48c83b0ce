"""Explicit credentials for one fetch, instead of the process environment.

A process that fetches for several owners (the adapter loader: one replica, many Adapters, each with its own
`source.credentialsSecretRef`) must not use one set of credentials for all of them. `Credentials` carries the
values of storage.uri.CREDENTIAL_ENV names (HF_TOKEN, AWS_*) for one fetch; the fetchers use them instead of
the environment when given (`fetcher_for(..., credentials=...)`), and never mix the two.

In a replica each referenced Secret is a read-only volume at `ADAPTER_CREDENTIALS_ROOT/<secret>` (one file per
key, as Kubernetes mounts Secrets); `from_secret_dir` reads it the way builders map a Secret onto env vars:
the whole Secret onto every CREDENTIAL_ENV name it has, or one key onto its scheme's TOKEN_ENV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraplane.storage.uri import CREDENTIAL_ENV, ArtifactUri

# A Secret value is a token or key: a few KiB at most. A bigger file is not read (a mounted wrong thing).
_MAX_VALUE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Credentials:
    """Credentials for one fetch: `values` by CREDENTIAL_ENV name (only the ones present), and `origin`, what
    messages call them ("Secret hf-token"); never printed with their values (repr hides them)."""

    origin: str
    values: dict[str, str] = field(default_factory=dict, repr=False)

    def get(self, name: str) -> str | None:
        """The value of one CREDENTIAL_ENV name, or None when these credentials do not have it."""
        return self.values.get(name) or None

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
        return cls(origin, values)
