"""What may go into a message a user reads (a condition, a replica report, a termination message, a log line).

Messages quote untrusted input, URIs above all: credentials in a URL's userinfo are never shown, nor the secret
parameters of a presigned URL (S3's X-Amz-Signature / X-Amz-Credential / X-Amz-Security-Token, GCS's
X-Goog-Signature, Azure SAS `sig`, `token`, `access_token`, `password`...: SECRET_PARAMS), and the text is cut
so a huge value cannot push a status, a pod annotation (256 KiB in all) or a termination message (4096
bytes) past its Kubernetes size limit.
"""

from __future__ import annotations

import re

MAX_SHOWN = 300            # characters of one quoted value (a URI) in a message
MAX_MESSAGE = 2000         # characters of one message in a replica report
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#@\s]*@")
# Query (or fragment) parameters whose value is a credential, case-insensitive: presigned S3/GCS URLs, Azure SAS,
# OAuth-style tokens in the URL.
SECRET_PARAMS = ("x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
                 "x-goog-credential", "signature", "sig", "token", "access_token", "auth", "password",
                 "secret", "key", "api_key", "apikey", "x-hf-token")
_SECRET_PARAM = re.compile(r"([?&#;](?:" + "|".join(re.escape(p) for p in SECRET_PARAMS) + r")=)[^&#\s\"']*",
                           re.IGNORECASE)


def scrubbed(text: str) -> str:
    """`text` with every credential a URL in it may carry masked (userinfo -> `***@`, SECRET_PARAMS values ->
    `***`), not cut: for messages that have their own size bound."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def redacted(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` fit for a message: scrubbed (no userinfo, no presigned-URL secrets) and cut to `limit` characters
    (ending in " …")."""
    text = scrubbed(text)
    return text if len(text) <= limit else text[:limit] + " …"
