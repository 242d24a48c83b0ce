"""One proxied request: sending it to a vLLM replica (retried elsewhere while that is safe), relaying the
answer (Server-Sent Events chunk by chunk as they arrive), and accounting for it (status, latency, TTFT, tokens).

An `Exchange` is driven by callbacks: from its `Upstream` (the answer's head, body chunks, end, or a lost
connection), from its `ClientConnection` (the client left) and from `Router.sweep` once its `deadline`
(router.timeoutSeconds) has passed. It
never blocks and has no task of its own, except while a new connection to vLLM is being opened.

When a request is resent: the connection failed before anything was sent (the replica is marked failed),
or vLLM answered 404 for an adapter (our view of what is loaded was stale: nothing was generated), at most
`router.max_attempts` attempts in all. Once vLLM has the request it is never resent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import TYPE_CHECKING

from loraplane.router.client_protocol import JSON, STATUS_PHRASES, ClientConnection, Request
from loraplane.router.replicas import Replica
from loraplane.router.table import BACKEND_HEADER, BackendRoute  # noqa: F401 (BACKEND_HEADER re-exported)
from loraplane.router.upstream import Upstream, open_upstream, take_idle

if TYPE_CHECKING:
    from loraplane.router.server import Router

log = logging.getLogger("loraplane.router")

_USAGE_VALUE = re.compile(rb'\s*:\s*\{')  # after `"usage"`: the key of an object (not a string value, not null)
_USAGE_SPAN = 2048  # bytes from the usage object's `{` that hold it (it is ~150 bytes; raw_decode stops at its end)
# vLLM's UsageInfo as it serialises it (prompt_tokens, total_tokens, completion_tokens, …): read with one match;
# any other layout is parsed.
_VLLM_USAGE = re.compile(rb'(?:\s*:\s*)?\{\s*"prompt_tokens"\s*:\s*(\d+)\s*,\s*"total_tokens"\s*:\s*\d+\s*,\s*'
                         rb'"completion_tokens"\s*:\s*(\d+)\s*[,}]')
# Connecting to another route's router (its Service) is tried this many times, this far apart, before the
# request fails with 502 `route_unreachable`: a Service's endpoints change under it (a router pod replaced, DNS
# or kube-proxy catching up, about a second), and nothing was sent, so a second attempt is safe. Istio's default
# retry policy is the same idea: 2 attempts on `connect-failure` (istio.io, "Traffic Management: retries").
EXTERNAL_ATTEMPTS = 2
EXTERNAL_RETRY_DELAY_S = 0.25
_STREAM_TRUE = re.compile(rb'\s*:\s*true')   # after `"stream"`
_ASK_USAGE = b'"stream_options":{"include_usage":true},'
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')  # vLLM's usage-only chunk, the last before [DONE]
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')  # a choice's terminal chunk (finish_reason not null)
_MAX_HELD = 1 << 20  # bytes of an unfinished SSE event held back while usage is being stripped
# A whole (not SSE) answer is collected to be sent with its Content-Length, up to this many bytes; a bigger one
# (an embeddings batch of many inputs, a huge answer of another route's router) is relayed from there on as it
# arrives (chunked, under the client connection's flow control), so one request cannot make the router hold
# gigabytes.
MAX_BUFFERED_ANSWER = 8 << 20
_DECODER = json.JSONDecoder()
CLIENT_CLOSED = 499  # nginx's code for "the client went away first"
STREAM_BROKEN = 599  # the replica failed after the stream had started: the client got a truncated stream


def _usage_braces(data: bytes) -> list[int]:
    """Offsets of the `{` of every `"usage": {` in `data`.

    In valid JSON an unescaped `"usage"` is always a whole string token (quotes inside strings are escaped),
    and one followed by `:` is a key; requiring an object value leaves out token texts keyed by `"usage"` in
    completions' top_logprobs (`{"usage": -0.3}`) and `"usage": null` in stream chunks. Prompt logprobs'
    `"decoded_token": "usage"` is a value, not a key."""
    out = []
    i = data.find(b'"usage"')
    while i >= 0:
        m = _USAGE_VALUE.match(data, i + 7)
        if m is not None:
            out.append(m.end() - 1)
        i = data.find(b'"usage"', i + 7)
    return out


def _counts(usage: object) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of a usage object (a missing or non-integer count is 0), or None
    when it has neither."""
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if p is None and c is None:
        return None
    ok = lambda n: n if type(n) is int and n >= 0 else 0  # noqa: E731
    return ok(p), ok(c)


def _usage_at(data: bytes, brace: int) -> tuple[int, int] | None:
    """The counts of the usage object whose `{` is at `brace` (vLLM's layout by one regex match, any other
    parsed with json's raw_decode: exactly that object), or None when it is not a complete object within
    _USAGE_SPAN bytes."""
    m = _VLLM_USAGE.match(data, brace)
    if m is not None:
        return int(m[1]), int(m[2])
    try:
        obj, _ = _DECODER.raw_decode(data[brace:brace + _USAGE_SPAN].decode("utf-8", "replace"))
    except ValueError:
        return None
    return _counts(obj)


def parse_usage(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a JSON response body's top-level `usage` object (None: none).

    vLLM's body has exactly one `"usage": {` (see `_usage_braces`), read without parsing the body (its
    logprobs can be megabytes); with several, the body is parsed and the top-level one read."""
    i = body.find(b'"usage"')
    if i >= 0 and body.find(b'"usage"', i + 7) < 0:   # the common case, in three C calls: one `"usage"`
        m = _VLLM_USAGE.match(body, i + 7)
        if m is not None:
            return int(m[1]), int(m[2])
    braces = _usage_braces(body)
    if len(braces) == 1:
        found = _usage_at(body, braces[0])
        if found is not None:
            return found
    elif not braces:
        return None
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return _counts(obj.get("usage")) if isinstance(obj, dict) else None


def parse_stream_usage(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last usage object in the end of an SSE stream: vLLM's usage chunk
    (the final totals; with continuous_usage_stats every chunk has running totals, the last is final)."""
    braces = _usage_braces(tail)
    return _usage_at(tail, braces[-1]) if braces else None


def ask_for_usage(payload: bytes) -> bytes | None:
    """The request body with `stream_options.include_usage: true` when it streams without asking for usage
    (most chat UIs), else None (unchanged). The exchange then strips the usage chunk vLLM adds, so the client
    receives exactly what it asked for, and the router still counts the request's tokens.

    Costs one search when the body has no `"stream": true`; a streaming body is parsed to be sure the key is
    the top-level one (vLLM refuses stream_options without stream). The key is spliced in without
    re-encoding the body when stream_options is absent; otherwise stream_options is rewritten with
    continuous_usage_stats off (it has no effect without include_usage, so the client's chunks stay the same).
    """
    # Backwards: SDKs write `stream` after the messages, so it is found near the end; a body without it costs
    # one rfind (several times faster than find or a regex search here: ~6 us per 100 KB).
    i = payload.rfind(b'"stream"')
    while i >= 0 and _STREAM_TRUE.match(payload, i + 8) is None:
        i = payload.rfind(b'"stream"', 0, i)
    if i < 0:
        return None
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    options = obj.get("stream_options")
    if options is None and "stream_options" not in obj:
        brace = payload.find(b"{")
        return b"".join((payload[:brace + 1], _ASK_USAGE, payload[brace + 1:]))
    if options is not None and not isinstance(options, dict):
        return None   # vLLM answers it with a 400, as it would without the router
    if options and options.get("include_usage") is True:
        return None   # asked for: counted from the stream's tail
    obj["stream_options"] = {**(options or {}), "include_usage": True, "continuous_usage_stats": False}
    # surrogatepass: a string of the body may be a lone surrogate (`"\ud800"`, which json.loads accepts);
    # vLLM's json.loads decodes these bytes back to the same string (plain .encode() raised on it).
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


class Exchange:
    """One proxied request, driven by callbacks from the upstream and client connections.

    `payload` is the body to send (the client's, with only `model` rewritten to `backend.served_name`),
    `path` the endpoint (b"/v1/completions" or b"/v1/chat/completions"). Answers the client exactly once:
    the relayed answer (with an X-Loraplane-Backend header naming the served name), or an OpenAI error:
    502 (no replica could be reached, or vLLM closed the connection before answering), 503 (the adapter is
    on no replica any more), 504 (router.timeoutSeconds passed). Counted in `backend.stats` by final
    status, 499 when the client left first, 599 when vLLM failed after a stream had started.

    `strip_usage`: the router added `stream_options.include_usage` to the payload (`ask_for_usage`), so the
    usage-only chunk vLLM sends last is counted and left out of what the client receives.

    `forward`: header lines (each with CRLF) sent instead of the route's engine key, for a request forwarded
    to another route's router (`replica.external`, router/forward.py): the client's own Authorization and the
    headers that router reads. `extra_headers`: header lines added to the answer (before X-Loraplane-Backend,
    which for a forwarded request is the other router's own, relayed by `ForwardUpstream`).
    """

    __slots__ = ("router", "conn", "req", "model", "backend", "stats", "replica", "payload", "head", "tried",
                 "upstream", "status", "streaming", "chunks", "tail", "first_byte", "deadline", "finished",
                 "retry_404", "path", "ctype", "attempt_open", "strip_usage", "held", "ending", "usage",
                 "extra_headers", "backend_line", "collected")

    def __init__(self, router: Router, conn: ClientConnection, req: Request, model: str, backend: BackendRoute,
                 replica: Replica, payload: bytes, path: bytes, strip_usage: bool = False,
                 forward: bytes | None = None, extra_headers: bytes = b""):
        self.router, self.conn, self.req, self.model = router, conn, req, model
        self.backend, self.stats, self.replica, self.payload = backend, backend.stats, replica, payload
        self.path = path
        self.ctype = JSON
        self.attempt_open = False
        self.tried: tuple[Replica, ...] = ()
        self.upstream: Upstream | None = None
        self.status = 0
        self.streaming = False
        self.chunks: list[bytes] = []
        self.tail = b""
        self.first_byte = True
        self.deadline = 0.0
        self.finished = False
        self.retry_404 = False
        self.strip_usage = strip_usage
        self.held = b""   # the unfinished SSE event while stripping usage
        self.ending: list[bytes] | None = None   # the held end of the stream (see _without_usage_event)
        self.usage: tuple[int, int] | None = None
        self.extra_headers = extra_headers or req.routed   # a content-routing decision's headers
        self.backend_line = backend.header_line   # X-Loraplane-Backend (ForwardUpstream: the other router's)
        self.collected = 0   # bytes of a whole answer collected so far (MAX_BUFFERED_ANSWER)
        rid = req.request_id
        # Everything after the Host line. To vLLM: the route's engine key; the client's own headers (its API key
        # above all) stay here. To another route's router (`forward`): the client's Authorization, never the key.
        self.head = b"Content-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n" % (
            len(payload), b"X-Request-Id: " + rid + b"\r\n" if rid else b"",
            router.engine_auth if forward is None else forward)

    def start(self) -> None:
        """Count it in flight, set its deadline and send it to `replica`."""
        self.stats.in_flight += 1
        router = self.router
        router.active += 1
        # Enforced by Router.sweep (within its interval, at most a quarter of the timeout): no timer per
        # request; arming and cancelling a loop timer was a measurable part of a request's CPU (issue 17).
        self.deadline = time.perf_counter() + router.timeout_seconds
        self.send()

    def _release_attempt(self) -> None:
        if self.attempt_open:
            self.attempt_open = False
            self.replica.in_flight -= 1

    def _request_head(self, replica: Replica) -> bytes:
        return b"POST %s HTTP/1.1\r\nHost: %s\r\n%s" % (self.path, replica.host_header, self.head)

    def send(self) -> None:
        """Send to `self.replica` on a pooled connection, or on a new one (opened in a task)."""
        replica = self.replica
        replica.in_flight += 1
        self.attempt_open = True
        up = take_idle(replica)
        if up is not None:
            self.upstream = up
            up.send(self, self._request_head(replica), self.payload)
            return
        self.router.loop.create_task(self._connect(replica))

    async def _connect(self, replica: Replica) -> None:
        try:
            up = await open_upstream(replica, self.router.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.connect_failed(replica, exc)
            return
        if self.finished:  # the client left or the request timed out while connecting
            up.release()
            return
        self.upstream = up
        up.send(self, self._request_head(replica), self.payload)

    def connect_failed(self, replica: Replica, exc: BaseException) -> None:
        """Nothing reached vLLM: safe to send elsewhere."""
        if self.finished:
            return
        self._release_attempt()
        if replica.external:
            # Another route's router behind its Service: not in this router's pool, nothing else serves it.
            log.warning("%s: connection failed (%s)", replica.name, exc or type(exc).__name__)
            self.tried += (replica,)
            if getattr(self.req, "fallback", None) is None and len(self.tried) < min(EXTERNAL_ATTEMPTS,
                                                                                      self.router.max_attempts):
                # Nothing was sent: once more after a pause, resolving the Service name again (its endpoints may
                # have just changed). A content-routed request goes to its default instead (_route_unavailable).
                self.stats.retries += 1
                self.router.loop.call_later(EXTERNAL_RETRY_DELAY_S, self._send_again)
                return
            if self._route_unavailable(502, True):
                return
            self.fail(502, f"could not connect to the router serving `{self.model}` ({replica.name})",
                      "bad_gateway", "route_unreachable")
            return
        self.router.pool.mark_failed(replica)
        log.warning("replica %s: connection failed (%s); not routing to it until it answers a poll", replica.name,
                    exc or type(exc).__name__)
        self.tried += (replica,)
        nxt = (self.router.pool.choose(self.backend.served_name, self.tried)
               if len(self.tried) < self.router.max_attempts else None)
        if nxt is None:
            self.fail(502, f"could not connect to a replica serving `{self.backend.served_name}`", "bad_gateway",
                      "replica_unreachable")
            return
        self.stats.retries += 1
        self.replica = nxt
        self.send()

    def _send_again(self) -> None:
        """The delayed second attempt to another route's router (connect_failed); nothing when the request
        ended meanwhile (its client left, or its deadline passed)."""
        if not self.finished:
            self.send()

    # ---- upstream callbacks ----

    def upstream_head(self, status: int, content_type: bytes) -> None:
        """vLLM's status line and headers arrived: a 200 event stream is relayed from here on (chunked);
        anything else is collected and answered whole; a 404 for an adapter is resent elsewhere."""
        self.status = status
        if (status == 404 and not self.backend.is_base and len(self.tried) + 1 < self.router.max_attempts):
            # vLLM does not have the adapter (our view was stale): nothing was generated, resend elsewhere.
            self.retry_404 = True
            return
        if content_type.startswith(b"text/event-stream") and status == 200:
            self.streaming = True
            t = self.conn.transport
            if t is not None:
                t.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nCache-Control: no-cache\r\n%s%s"
                        b"Transfer-Encoding: chunked\r\n%s\r\n" % (
                            content_type, self.extra_headers, self.backend_line,
                            b"" if self.req.keep_alive else b"Connection: close\r\n"))
        else:
            self.ctype = content_type

    def upstream_body(self, data: bytes) -> None:
        """One piece of vLLM's answer body (de-chunked): relayed at once when streaming, else collected."""
        if self.streaming:
            if self.first_byte:
                self.first_byte = False
                self.stats.ttft.observe(time.perf_counter() - self.req.started)
            if self.strip_usage:
                data = self._without_usage_event(data)
                if not data:
                    return
            else:   # keep the end of the stream: the usage chunk comes last
                self.tail = data if len(data) >= 2048 else (self.tail + data)[-4096:]
            t = self.conn.transport
            if t is not None:
                t.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif not self.retry_404:
            self.chunks.append(data)
            self.collected += len(data)
            if self.collected > MAX_BUFFERED_ANSWER:
                self._relay_from_here()

    def _relay_from_here(self) -> None:
        """A whole answer over MAX_BUFFERED_ANSWER: send its head (chunked) and what arrived so far, and relay the
        rest as it arrives, as a stream is (`streaming`; its end and usage are handled the same way)."""
        self.streaming = True
        self.first_byte = False   # not a token stream: no time to first token
        self.strip_usage = False
        body = b"".join(self.chunks)
        self.chunks = []
        self.tail = body[-4096:]
        t = self.conn.transport
        if t is not None:
            t.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%sTransfer-Encoding: chunked\r\n%s\r\n"
                    b"%x\r\n%s\r\n" % (
                self.status, STATUS_PHRASES.get(self.status, b"Unknown"), self.ctype, self.extra_headers,
                self.backend_line, b"" if self.req.keep_alive else b"Connection: close\r\n", len(body), body))

    def upstream_complete(self) -> None:
        """vLLM's answer is complete: finish the client's answer, count status and usage tokens."""
        self.upstream = None
        if self.finished:
            return
        if self.retry_404:
            self.retry_404 = False
            replica = self.replica
            self._release_attempt()
            self.router.pool.mark_missing(replica, self.backend.served_name)
            self.tried += (replica,)
            nxt = self.router.pool.choose(self.backend.served_name, self.tried)
            if nxt is None:
                self.fail(503, f"`{self.backend.served_name}` is not loaded on any replica yet", "service_unavailable",
                          "adapter_not_loaded", extra=b"Retry-After: 2\r\n")
                return
            self.stats.retries += 1
            self.replica = nxt
            self.send()
            return
        stats = self.stats
        if self.streaming:
            t = self.conn.transport
            held = self._end_of_stream() if self.strip_usage else b""
            if t is not None:
                t.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(held), held) if held else b"0\r\n\r\n")
            usage = self.usage if self.strip_usage else parse_stream_usage(self.tail)
        else:
            body = b"".join(self.chunks)
            t = self.conn.transport
            if t is not None:
                t.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s%s\r\n%s" % (
                    self.status, STATUS_PHRASES.get(self.status, b"Unknown"), self.ctype, len(body),
                    self.extra_headers, self.backend_line,
                    b"" if self.req.keep_alive else b"Connection: close\r\n", body))
            usage = parse_usage(body) if self.status == 200 else None
        if usage is not None:
            stats.prompt_tokens += usage[0]
            stats.completion_tokens += usage[1]
        self.replica.requests_total += 1
        self._finish(self.status)
        self.conn.done(self.req.keep_alive)

    def _without_usage_event(self, data: bytes) -> bytes:
        """What of `data` to relay now while the usage chunk is stripped: complete SSE events only (an
        unfinished one waits for its end, in practice within the same read) up to the stream's end, which is
        held from its first terminal chunk (a choice with a finish_reason) or the usage chunk on, and relayed
        by `_end_of_stream` once the answer is complete."""
        if self.held:
            data = self.held + data
        if self.ending is not None:   # in the held end: everything waits for the answer's end
            self.held = b""
            self.ending.append(data)
            return b""
        cut = data.rfind(b"\n\n") + 2
        if cut < 2:   # no event ends here
            if len(data) > _MAX_HELD:   # not the SSE vLLM writes: relay it as it is
                self.held = b""
                return data
            self.held = data
            return b""
        out, self.held = data[:cut], data[cut:]
        m = _FINISHED.search(out)
        u = _EMPTY_CHOICES.search(out) if b"[]" in out else None   # a fast search first: few events have []
        if m is None and u is None:
            return out
        first = min(x.start() for x in (m, u) if x is not None)
        start = out.rfind(b"\n\n", 0, first)
        start = 0 if start < 0 else start + 2
        self.ending = [out[start:]]
        return out[:start]

    def _end_of_stream(self) -> bytes:
        """The held end of the stream as vLLM would have sent it without include_usage: its usage-only event
        (`"choices":[]`) removed and counted into `usage`, and the `system_fingerprint` that vLLM then moves
        from the terminal chunks to the usage chunk put back on them (as vLLM writes it: the last field)."""
        rest = b"".join((*(self.ending or ()), self.held))
        self.ending, self.held = None, b""
        if b"[]" not in rest:
            return rest
        events = rest.split(b"\n\n")
        for k, event in enumerate(events):
            if event.startswith(b"data:") and _EMPTY_CHOICES.search(event):
                try:
                    chunk = json.loads(event[5:])
                except (ValueError, UnicodeDecodeError):
                    continue
                if isinstance(chunk, dict) and chunk.get("choices") == [] and "usage" in chunk:
                    break
        else:
            return rest
        del events[k]
        self.usage = _counts(chunk["usage"])
        fingerprint = chunk.get("system_fingerprint")
        if isinstance(fingerprint, str):
            field = b',"system_fingerprint":%s}' % json.dumps(fingerprint).encode()
            for n, event in enumerate(events):
                if (event.startswith(b"data:") and event.endswith(b"}") and _FINISHED.search(event)
                        and b'"system_fingerprint"' not in event):
                    events[n] = event[:-1] + field
        return b"\n\n".join(events)

    def upstream_lost(self, exc: BaseException | None) -> None:
        """The replica closed the connection mid-answer. The request reached it: never resent."""
        self.upstream = None
        if self.finished:
            return
        log.warning("replica %s: connection lost mid-request (%s)", self.replica.name, exc or "closed")
        if self.streaming:
            self._finish(STREAM_BROKEN)
            t = self.conn.transport
            if t is not None:
                held = self._end_of_stream() if self.strip_usage else b""
                if held:   # what vLLM did send, as it would have reached the client directly
                    t.write(b"%x\r\n%s\r\n" % (len(held), held))
            # No terminating chunk: the client sees a truncated stream, not a complete one. `done`, not a bare
            # close: a connection left busy with a finished exchange had no deadline, and close() waits for a
            # client that reads nothing to take what is buffered (held for ever; the sweep's idle deadline then
            # aborts it, ClientConnection.timed_out).
            self.conn.done(False)
            return
        self.fail(502, "the replica closed the connection before answering", "bad_gateway", "replica_failed")

    def route_failed(self, status: int) -> bool:
        """Another route's router answered `status` 502 or 503 and its answer is complete (ForwardUpstream calls
        this instead of `upstream_complete`, so a request to vLLM pays nothing for it): see _route_unavailable.
        True when the request went to its content model's default; else relay the answer (upstream_complete)."""
        if self.finished:
            return False
        self.upstream = None
        return self._route_unavailable(status, status == 503)

    def _route_unavailable(self, status: int, resend: bool) -> bool:
        """A forward to another route's router failed before any byte reached the client (`status`: 503 it
        answered, 502 it answered or it could not be reached): mark the external model unavailable for content
        routing (Orchestrator.mark_unavailable, for its Retry-After) and, when `resend` and the request was
        content-routed there (`req.fallback`), send it to its content model's default instead: True when it did
        (this exchange is finished, counted with `status`). Resent only when nothing was generated there: its
        router was not reached, or it answered 503 (no ready replica); its 502 may come after its vLLM got the
        request, so that one is relayed."""
        retry = None
        if status == 503:
            i = self.backend_line.lower().find(b"retry-after:")
            if i >= 0:
                retry = self.backend_line[i + 12:self.backend_line.find(b"\r\n", i)]
        self.router.orchestrator.mark_unavailable(self.model, retry)
        fallback, self.req.fallback = getattr(self.req, "fallback", None), None
        if not resend or fallback is None or not fallback():
            return False
        self._finish(status)   # this attempt, under the external backend; the default's exchange answers
        return True

    # ---- client / deadline events ----

    def client_lost(self) -> None:
        """The client closed its connection: count 499 and close the connection to vLLM (it aborts)."""
        if not self.finished:
            self._finish(CLIENT_CLOSED)
            self._drop_upstream()  # closing it makes vLLM abort the generation

    def timed_out(self) -> None:
        """router.timeoutSeconds passed without a complete answer: 504 (or a cut stream if one started)."""
        if self.finished:
            return
        log.warning("replica %s: no complete answer within %ss", self.replica.name, self.router.timeout_seconds)
        if self.streaming:
            self._finish(504)
            self._drop_upstream()
            self.conn.done(False)   # a cut stream ends the answer: closed, and judged as any connection (done)
            return
        self._drop_upstream()
        self.fail(504, "the replica did not answer in time (router.timeoutSeconds)", "timeout", "upstream_timeout")

    def fail(self, status: int, message: str, type_: str, code: str, extra: bytes = b"") -> None:
        """Finish with an OpenAI error answer (nothing was sent to the client yet)."""
        self._finish(status, log_always=True)
        self.conn.respond_error(status, message, type_, code, extra=extra + self.req.routed,
                                close=not self.req.keep_alive)

    def _drop_upstream(self) -> None:
        up, self.upstream = self.upstream, None
        if up is not None:
            up.exchange = None
            up.close()

    def _finish(self, status: int, log_always: bool = False) -> None:
        self.finished = True
        self._release_attempt()
        self.router.active -= 1
        stats = self.stats
        stats.in_flight -= 1
        stats.count(status)
        elapsed = time.perf_counter() - self.req.started
        stats.duration.observe(elapsed)
        if self.router.access_log or log_always or status >= 500:
            log.info("%s %s model=%s backend=%s replica=%s status=%d %.1fms", self.req.method.decode(),
                     self.req.path.decode(), self.model, self.backend.served_name, self.replica.name, status,
                     elapsed * 1000)
