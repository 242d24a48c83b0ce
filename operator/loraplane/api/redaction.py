"""What may go into a message a user reads (a condition, a replica report, a termination message, a log line).

Messages quote untrusted input, URIs above all: credentials in a URL's userinfo are never shown, and the text is
cut so a huge value cannot push a status, a pod annotation (256 KiB in all) or a termination message (4096
bytes) past its Kubernetes size limit.
"""

from __future__ import annotations

import re

MAX_SHOWN = 300            # characters of one quoted value (a URI) in a message
MAX_MESSAGE = 2000         # characters of one message in a replica report
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/?#@\s]*@")


def redacted(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` fit for a message: the userinfo of every URL in it (`scheme://user:password@`) replaced by
    `scheme://***@`, and cut to `limit` characters (ending in " …")."""
    text = _USERINFO.sub(r"\1***@", text)
    return text if len(text) <= limit else text[:limit] + " …"
