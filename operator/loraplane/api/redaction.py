"""What may go into a message a user reads (a condition, a replica report, a termination message, a log line).

Messages quote untrusted input, URIs above all. `scrubbed` masks every credential a URI or a header quoted in
text may carry:

- a URL's userinfo (`scheme://USER:PASSWORD@host`): everything up to the LAST `@` of the authority, since a
  password may hold a raw `@` (as urllib.parse and yarl split it); and a password holding a raw `/`, `?` or `#`
  (`user:pa/ss@host`), which ends the authority early, up to the first `@` after it;
- the value of every query, fragment or `;` parameter whose name, percent-decoded (`X%2DAmz%2DSignature`) and
  case-folded, contains one of SECRET_NAME_PARTS (token, secret, signature, credential, password, key, auth, sig,
  code...): presigned S3/GCS URLs, Azure SAS and function keys, OAuth codes, `hf_token`, `client_secret`,
  `private_token`, `api-key`, `Authorization`;
- `Authorization:` / `X-Api-Key:`-style header values and `Bearer ...` tokens quoted in text.

Over-masking a harmless parameter is the accepted cost of never showing a secret one. `redacted` also cuts the
text so a huge value cannot push a status, a pod annotation (256 KiB in all) or a termination message (4096
bytes) past its Kubernetes size limit.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

MAX_SHOWN = 300            # characters of one quoted value (a URI) in a message
MAX_MESSAGE = 2000         # characters of one message in a replica report
# A parameter whose (decoded, case-folded) name contains any of these has a credential for a value.
SECRET_NAME_PARTS = ("token", "secret", "signature", "credential", "password", "passwd", "pwd", "key", "auth",
                     "sig", "code", "session", "jwt", "cookie", "private")
# A URL is `SCHEME://BODY`: SCHEME a letter then letters, digits, '+', '.' or '-', BODY up to whitespace, a
# quote or '<>'. `_mask_urls` finds them by their "://" and walks back over the scheme: the regex it replaces
# (`\b[a-zA-Z][a-zA-Z0-9+.-]*://`), tried at every word start of a long run of scheme characters ("a-a-a-…"),
# took time quadratic in it (minutes for the 1 MB adapter_config.json value a loader message quotes), and every
# status message goes through here.
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_URL_BODY = re.compile(r"[^\s\"'<>]*")
_PARAM = re.compile(r"([?&#;])([^=&#;?\s\"'<>]{1,200})=")
_VALUE_END = frozenset("&; \t\r\n\"'<>")
_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization|x-api-key|api-key|x-auth-token|private-token|cookie)"
                     r"([\"']?\s*[:=]\s*[\"']?)(?:(bearer|basic|token|digest|aws4-hmac-sha256)\s+)?[^\s\"',;]+")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{6,}|\b(basic)\s+[A-Za-z0-9+/=]{12,}")


def _secret_name(name: str) -> bool:
    for _ in range(3):   # a name percent-encoded more than once
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    name = name.lower()
    return any(part in name for part in SECRET_NAME_PARTS)


def _mask_urls(text: str) -> str:
    """`text` with each URL's userinfo masked (`_mask_userinfo`); time linear in len(text)."""
    out: list[str] = []
    pos = 0   # text before pos is done; no scheme starts before it
    find = 0
    while (sep := text.find("://", find)) != -1:
        run = sep
        while run > pos and text[run - 1] in _SCHEME_CHARS:
            run -= 1
        # the scheme starts at the run's first letter (runs never overlap, so walking back and scanning forward
        # visit each character a bounded number of times). Unlike the regex's word boundary, a scheme glued to
        # a word character (`_https://`, `1s3://`) is masked too.
        start = next((i for i in range(run, sep) if text[i].isalpha()), None)
        if start is None:
            find = sep + 1
            continue
        body_end = _URL_BODY.match(text, sep + 3).end()
        out.append(text[pos:start] + _mask_userinfo(text[start:sep + 3], text[sep + 3:body_end]))
        pos = find = body_end
    out.append(text[pos:])
    return "".join(out)


def _mask_userinfo(scheme: str, body: str) -> str:
    end = len(body)
    for sep in "/?#":
        pos = body.find(sep)
        if pos != -1:
            end = min(end, pos)
    at = body.rfind("@", 0, end)
    if at == -1 and not body.startswith("[") and ":" in body[:end] and "@" in body[end:]:
        # `user:pa/ss@host`: what follows the colon is no port, so the authority was cut by the password.
        after = body[:end].split(":", 1)[1]
        if not after.isdigit():
            at = body.find("@", end)
    return scheme + ("***@" + body[at + 1:] if at != -1 else body)


def _mask_params(text: str) -> str:
    out: list[str] = []
    i = 0
    while (m := _PARAM.search(text, i)) is not None:
        if not _secret_name(m.group(2)):
            out.append(text[i:m.end()])
            i = m.end()
            continue
        end = m.end()
        while end < len(text) and text[end] not in _VALUE_END:
            end += 1   # the value runs to the next parameter: a raw '#' in it does not end it
        out.append(text[i:m.end()] + "***")
        i = end
    out.append(text[i:])
    return "".join(out)


def scrubbed(text: str) -> str:
    """`text` with every credential a URL or header in it may carry masked (module docstring: userinfo ->
    `***@`, secret parameter values and header values -> `***`), not cut: for messages that have their own size
    bound."""
    text = _mask_urls(text)
    text = _mask_params(text)
    text = _HEADER.sub(lambda m: m.group(1) + m.group(2) + (m.group(3) + " " if m.group(3) else "") + "***", text)
    return _BEARER.sub(lambda m: (m.group(1) or m.group(2)) + " ***", text)


def redacted(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` fit for a message: scrubbed (no userinfo, no presigned-URL secrets) and cut to `limit` characters
    (ending in " …")."""
    text = scrubbed(text)
    return text if len(text) <= limit else text[:limit] + " …"


class ScrubbingFormatter(logging.Formatter):
    """A log formatter whose output (message, arguments and traceback) is `scrubbed`; wraps the handler's own."""

    def __init__(self, inner: logging.Formatter | None = None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        """The inner formatter's text, scrubbed."""
        return scrubbed(self.inner.format(record))


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Scrub every line the handlers of `logger` (default: the root logger) write: call after
    logging.basicConfig in a program whose logs quote untrusted URIs or error texts (trainer, loader,
    fetch-model). Idempotent."""
    for handler in (logger or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, ScrubbingFormatter):
            handler.setFormatter(ScrubbingFormatter(handler.formatter))
