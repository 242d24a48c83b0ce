"""An in-process stand-in for one vLLM replica and its loader, for the router's fast tests.

It speaks the parts of vLLM's OpenAI API the router touches (completions, chat completions with SSE
streaming and the final usage chunk, /v1/models, /metrics) and the loader's /status (a ReplicaReport).
The real vLLM server is exercised by the tests marked `vllm`; this stub lets every routing rule be
tested in milliseconds, including failures a real server cannot be made to show on demand.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

from loraplane.api.wire.serving import ReplicaReport


FINGERPRINT = "vllm-stub-0"


@dataclass(eq=False)
class StubReplica:
    name: str
    base: str = "base"
    adapters: set[str] = field(default_factory=set)   # served names the loader reports Ready
    draining: set[str] = field(default_factory=set)   # served names the loader reports Draining (left the table)
    engine_ready: bool = True
    engine_load: int = 0                              # reported as running + waiting in /metrics
    missing: set[str] = field(default_factory=set)    # served names vLLM answers 404 for despite the report
    failing: set[str] = field(default_factory=set)    # served names vLLM answers 500 for (a broken version)
    status_fails: bool = False                        # the loader's /status answers 500
    big_stream: int = 0                               # streams send this many 64 KiB events instead
    hold: asyncio.Event | None = None                 # completions wait for it before answering
    hold_models: set[str] | None = None               # ...only those for these served names (None: all)
    stream_gate: asyncio.Event | None = None          # streams wait for it after the first chunk
    stream_piece: int = 0                             # streams are written in pieces of this many bytes
    extra_fields: dict = field(default_factory=dict)  # added to plain answers after `usage` (as vLLM's prompt_logprobs)
    received: list[tuple[str, bytes, object]] = field(default_factory=list)  # (path, body, headers)
    models_auth: list[str | None] = field(default_factory=list)  # Authorization of each /v1/models request
    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status)
        return app

    async def start(self) -> "StubReplica":
        self.server = TestServer(self.app())
        await self.server.start_server()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    @property
    def engine_url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def status_url(self) -> str:
        return str(self.server.make_url("/status"))

    @property
    def spec(self) -> str:
        """The router's --replica value for this stub."""
        return f"{self.engine_url},{self.status_url}"

    async def status(self, request: web.Request) -> web.Response:
        if self.status_fails:
            return web.Response(status=500, text="loader busy")
        report = ReplicaReport(
            replica=self.name, route="r", generation=1, engine_ready=self.engine_ready, updated_at="2026-01-01T00:00:00Z",
            adapters={**{a: {"state": "Ready", "reason": "Loaded", "since": "2026-01-01T00:00:00Z"} for a in self.adapters},
                      **{a: {"state": "Draining", "reason": "Draining", "since": "2026-01-01T00:00:00Z"}
                         for a in self.draining}})
        return web.Response(body=report.model_dump_json(), content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        self.models_auth.append(request.headers.get("Authorization"))
        data = [{"id": n, "object": "model"} for n in [self.base, *sorted(self.adapters)]]
        return web.json_response({"object": "list", "data": data})

    async def metrics(self, request: web.Request) -> web.Response:
        text = (f'vllm:num_requests_running{{engine="0",model_name="{self.base}"}} {float(self.engine_load)}\n'
                f'vllm:num_requests_waiting{{engine="0",model_name="{self.base}"}} 0.0\n')
        return web.Response(text=text)

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append((request.path, body, request.headers.copy()))  # case-insensitive
        req = json.loads(body)
        model = req["model"]
        if model != self.base and (model not in self.adapters | self.draining or model in self.missing):
            return web.json_response({"error": {"message": f"The model `{model}` does not exist.",
                                                "type": "NotFoundError", "param": "model", "code": 404}},
                                     status=404)
        if model in self.failing:
            return web.json_response({"error": {"message": "internal error", "type": "InternalServerError",
                                                "code": 500}}, status=500)
        if self.hold is not None and (self.hold_models is None or model in self.hold_models):
            await self.hold.wait()
        usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
        if not req.get("stream"):
            return web.json_response({"id": "cmpl-1", "object": "text_completion", "model": model,
                                      "replica": self.name, "choices": [{"index": 0, "text": "a b c"}],
                                      "usage": usage, **self.extra_fields})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        if self.big_stream:
            event = b"data: " + b"x" * (65536 - 8) + b"\n\n"
            for _ in range(self.big_stream):
                await resp.write(event)  # waits while the router does not read (backpressure)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        # vLLM's framing: one `data: <compact JSON>\n\n` event per chunk; the usage-only chunk (empty choices)
        # last, when stream_options.include_usage asks for it.
        options = req.get("stream_options") or {}
        events = []
        # As vLLM does, the terminal chunk (finish_reason set) carries system_fingerprint, which moves to the
        # usage chunk when there is one.
        for word, finish in (("a", None), ("b", None), ("c", "length")):
            chunk = {"id": "cmpl-1", "model": model, "replica": self.name,
                     "choices": [{"index": 0, "text": word, "finish_reason": finish}]}
            if options.get("include_usage") and options.get("continuous_usage_stats"):
                chunk["usage"] = usage
            if finish and not options.get("include_usage"):
                chunk["system_fingerprint"] = FINGERPRINT
            events.append(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())
        if options.get("include_usage"):
            final = {"id": "cmpl-1", "model": model, "choices": [], "usage": usage, "system_fingerprint": FINGERPRINT}
            events.append(f"data: {json.dumps(final, separators=(',', ':'))}\n\n".encode())
        events.append(b"data: [DONE]\n\n")
        if self.stream_piece:
            stream = b"".join(events)
            events = [stream[i:i + self.stream_piece] for i in range(0, len(stream), self.stream_piece)]
        for i, event in enumerate(events):
            await resp.write(event)
            if i == 0 and self.stream_gate is not None:
                await self.stream_gate.wait()
        await resp.write_eof()
        return resp
