"""One bounded reader of an HTTP response body, for every body a loraplane process reads from a peer it does not
trust (a loader's `/status`, vLLM's `/v1/models` and `/metrics`): the operator's report relay
(controllers/reports.py) and the router's replica polls (router/replicas.py) both use it.

It reads to the end of the stream (one `read()` returns only what has arrived so far, and a body larger than a
TCP window arrives in pieces), and refuses a body over `limit` bytes as soon as the declared Content-Length or the
running total says so: a peer that lies about its length, sends none or streams forever costs at most `limit`
bytes of memory (the caller's timeout bounds the time).
"""

from __future__ import annotations

import aiohttp

# Bytes asked of the stream per read while accumulating a body.
CHUNK_BYTES = 64 * 1024


class BodyTooLarge(ValueError):
    """An HTTP response body larger than the reader's limit (a ValueError: the peer answered something unusable)."""


async def read_bounded(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body of `resp`, at most `limit` bytes. Raises BodyTooLarge (naming `what`, e.g. the URL, and
    the limit) when the Content-Length or the bytes received exceed it; aiohttp.ClientError /
    asyncio.TimeoutError from the transport pass through."""
    if (resp.content_length or 0) > limit:
        raise BodyTooLarge(f"{what}: {resp.content_length} bytes, more than the limit of {limit}")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"{what}: more than the limit of {limit} bytes")
    return bytes(body)


__all__ = ["BodyTooLarge", "CHUNK_BYTES", "read_bounded"]
