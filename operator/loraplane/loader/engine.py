"""A small client of the vLLM OpenAI server's runtime-LoRA API (the engine beside the loader)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from loraplane.api.reasons import Reason


class EngineError(Exception):
    """vLLM answered a request with an error: its HTTP `status` and its error `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Probe:
    """A greedy completion: its text and per-token log-probabilities."""

    text: str
    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]

    def differs_from(self, other: Probe, tolerance: float = 1e-4) -> bool:
        """True when the output (or, while the tokens agree, any token's log-probability) changed."""
        if self.tokens != other.tokens or self.text != other.text:
            return True
        return any(abs(a - b) > tolerance for a, b in zip(self.logprobs, other.logprobs))


class VllmClient:
    """The calls the loader makes to one vLLM OpenAI server at `base_url` (--enable-lora, runtime LoRA updating
    allowed): /health, /v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter and /v1/completions.
    `request_timeout` is seconds per request; `api_key`, when set, is sent as `Authorization: Bearer` (the
    route's engine key: vLLM's --api-key guards every /v1/ path)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, request_timeout: float = 60,
                 api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=request_timeout)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def _request(self, method: str, path: str, json: dict | None = None) -> tuple[int, str, object]:
        async with self.session.request(method, self.base_url + path, json=json, timeout=self.timeout,
                                        headers=self.headers) as resp:
            text = await resp.text()
            try:
                body = await resp.json(content_type=None) if text else None
            except ValueError:
                body = None
            return resp.status, text, body

    async def healthy(self) -> bool:
        """True when vLLM answers GET /health with 200; False on any other status or a connection error."""
        try:
            status, _, _ = await self._request("GET", "/health")
            return status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def models(self) -> list[dict]:
        """The model cards of GET /v1/models (`data`: the base model and every loaded adapter). Raises
        EngineError on a non-200 answer."""
        status, text, body = await self._request("GET", "/v1/models")
        if status != 200 or not isinstance(body, dict):
            raise EngineError(status, text[:500])
        return list(body.get("data") or [])

    async def loaded_adapters(self) -> dict[str, str]:
        """served name -> path of every LoRA adapter the engine has (model cards with a parent)."""
        return {m["id"]: m.get("root", "") for m in await self.models() if m.get("parent")}

    async def load(self, name: str, path: str) -> None:
        """POST /v1/load_lora_adapter: load the PEFT directory `path` under `name` (needs
        VLLM_ALLOW_RUNTIME_LORA_UPDATING). Raises EngineError with vLLM's message on a non-200 answer."""
        status, text, body = await self._request("POST", "/v1/load_lora_adapter",
                                                 {"lora_name": name, "lora_path": path})
        if status != 200:
            raise EngineError(status, _message(text, body))

    async def unload(self, name: str) -> None:
        """POST /v1/unload_lora_adapter for `name`; a 404 (not loaded) counts as done. Raises EngineError otherwise."""
        status, text, body = await self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):   # 404: already gone, which is what we wanted
            raise EngineError(status, _message(text, body))

    async def probe(self, model: str, prompt: str, max_tokens: int) -> Probe:
        """A greedy (temperature 0, seed 0) completion of `prompt` from `model`, up to `max_tokens` tokens, with
        each token's log-probability. Raises EngineError on a non-200 answer."""
        status, text, body = await self._request("POST", "/v1/completions", {
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1,
            "seed": 0,
        })
        if status != 200 or not isinstance(body, dict):
            raise EngineError(status, _message(text, body))
        choice = body["choices"][0]
        lp = choice.get("logprobs") or {}
        return Probe(text=choice.get("text") or "", tokens=tuple(lp.get("tokens") or ()),
                     logprobs=tuple(float(x) for x in (lp.get("token_logprobs") or ()) if x is not None))


def _message(text: str, body: object) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    return text[:500]


def classify_load_error(err: EngineError) -> tuple[Reason, bool]:
    """(reason, retryable) for a failed load. vLLM's status codes are not a reliable classification (most
    validation failures are HTTP 500), so the message decides."""
    msg = err.message.lower()
    if "max_lora_rank" in msg or "greater than max" in msg:
        return Reason.RankTooLarge, False
    if "modules_to_save" in msg:
        return Reason.UnsupportedModulesToSave, False
    if "does not support" in msg or "not supported" in msg:
        return Reason.UnsupportedAdapterFeature, False
    if "already been loaded" in msg:   # a race with another client: the next pass sees it and compares paths
        return Reason.AlreadyLoaded, True
    if err.status == 404 or "no adapter found" in msg or "does not exist" in msg:
        return Reason.AdapterNotFound, True
    return Reason.LoadFailed, True
