"""What may go into a message a user reads (a condition, a replica report, a termination message, a log line).

Messages quote untrusted input, URIs above all. `scrubbed` masks every credential a URI or a header quoted in
text may carry:

- a URL's userinfo (`scheme://USER:PASSWORD@host`): everything up to the LAST `@` of the authority, since a
  password may hold a raw `@` (as urllib.parse and yarl split it); and a password holding a raw `/`, `?` or `#`
  (`user:pa/ss@host`), which ends the authority early, up to the first `@` after it; every URL, also one inside
  or glued to another's body (`?next=http://u:p@h`, `http://u:p@a,https://u:p@b`);
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


def _scheme_start(text: str, sep: int, floor: int) -> int | None:
    """Where the scheme of the "://" at `sep` begins: the first letter of the run of scheme characters before it
    (not before `floor`), or None when that run has no letter (no URL). Runs end at ':' and '/', so walks back
    from successive "://" never cross each other."""
    run = sep
    while run > floor and text[run - 1] in _SCHEME_CHARS:
        run -= 1
    return next((i for i in range(run, sep) if text[i].isalpha()), None)


def _mask_urls(text: str) -> str:
    """`text` with each URL's userinfo masked (`_userinfo_end`); time linear in len(text).

    Every URL is masked, also one inside or glued to another's body (`https://a/?next=http://u:p@b`,
    `http://u:p@a,https://u:p@b`, a Markdown `[https://u:p@a](https://u:p@a)`): a body runs to the next space
    or quote, and the second URL's credentials were shown when that body was skipped whole. A URL within a
    masked userinfo (a password holding `x://`) stays masked with it."""
    out: list[str] = []
    pos = 0   # text before pos is written out; a scheme never starts before it
    find = 0
    body_end = -1   # where the last body scanned ends: a URL nested in it ends there too (each run scanned once)
    memo = [-1, -1]   # _userinfo_end's: [from, the first '@' in text[from:body_end], or -1]
    while (sep := text.find("://", find)) != -1:
        # the scheme starts at the run's first letter. Unlike the old regex's word boundary, a scheme glued to
        # a word character (`_https://`, `1s3://`) is masked too.
        start = _scheme_start(text, sep, pos)
        if start is None:
            find = sep + 1
            continue
        begin = sep + 3
        if begin >= body_end:
            body_end = _URL_BODY.match(text, begin).end()
            memo[0] = memo[1] = -1
        at = _userinfo_end(text, begin, body_end, memo)
        if at == -1:
            out.append(text[pos:begin])
            pos = find = begin
        else:
            out.append(text[pos:begin] + "***@")
            pos = find = at + 1
    out.append(text[pos:])
    return "".join(out)


def _userinfo_end(text: str, begin: int, body_end: int, memo: list[int]) -> int:
    """The index of the '@' that ends the userinfo of the URL whose body is text[begin:body_end], or -1 when it
    has none: the LAST '@' of the authority (a password may hold a raw '@', as urllib.parse and yarl split it);
    for a password holding a raw '/', '?' or '#' (`user:pa/ss@host`), which ends the authority early, the first
    '@' after it. Bounded scans only (nested URLs share a body): the authority ends at the first '/', '?' or '#'
    (each searched before the last found), and the first '@' after it is kept in `memo` for the next URL."""
    end = body_end
    for sep in "/?#":
        found = text.find(sep, begin, end)
        if found != -1:
            end = found
    at = text.rfind("@", begin, end)
    if at != -1 or end == body_end or text.startswith("[", begin):
        return at
    colon = text.find(":", begin, end)
    if colon == -1 or text[colon + 1:end].isdigit():
        return -1   # no password, or `host:port`
    if not (memo[0] != -1 and memo[0] <= end and (memo[1] == -1 or memo[1] >= end)):
        memo[0], memo[1] = end, text.find("@", end, body_end)
    return memo[1]


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
