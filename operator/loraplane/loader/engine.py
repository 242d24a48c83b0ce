"""A small client of the vLLM OpenAI server's runtime-LoRA API (the engine beside the loader)."""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass

import aiohttp

from loraplane.api.reasons import Reason
from loraplane.storage.httpbody import BodyTooLarge, read_bounded


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

    @property
    def finite(self) -> bool:
        """False when a generated token's log-probability is missing, NaN or infinite (a greedy token's
        log-probability is finite unless the logits were NaN/Inf)."""
        return len(self.logprobs) == len(self.tokens) and all(math.isfinite(x) for x in self.logprobs)

    def differs_from(self, other: Probe, tolerance: float = 1e-4) -> bool:
        """True when the output (or, while the tokens agree, any token's log-probability) changed."""
        if self.tokens != other.tokens or self.text != other.text:
            return True
        return any(abs(a - b) > tolerance for a, b in zip(self.logprobs, other.logprobs))


# The most of vLLM's /metrics read (bytes): a few hundred KB with many adapters and histograms; the loader reads
# it for adapters_in_use and serves it to Prometheus (server.py), never unbounded into its memory.
METRICS_MAX_BYTES = 16 << 20


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

    async def metrics_text(self, limit: int = METRICS_MAX_BYTES) -> str:
        """vLLM's GET /metrics (Prometheus text), at most `limit` bytes read. Raises EngineError on a non-200
        answer or a longer body, aiohttp/asyncio errors when vLLM cannot be reached."""
        async with self.session.get(self.base_url + "/metrics", timeout=self.timeout, headers=self.headers) as resp:
            try:
                body = await read_bounded(resp, limit, "vLLM's /metrics")
            except BodyTooLarge as exc:
                raise EngineError(502, str(exc)) from exc
            if resp.status != 200:
                raise EngineError(resp.status, body[:500].decode(errors="replace"))
            return body.decode(errors="replace")

    async def adapters_in_use(self) -> frozenset[str] | None:
        """The LoRA adapters vLLM runs or queues requests with now, from its /metrics: nothing when
        `vllm:num_requests_running` + `vllm:num_requests_waiting` is 0, else the adapters named by the newest
        `vllm:lora_requests_info` series (labels running_lora_adapters, waiting_lora_adapters; its value is the
        time it was recorded). None when /metrics cannot be read or has neither family (then nothing is known)."""
        try:
            text = await self.metrics_text()
        except (EngineError, aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None
        return parse_adapters_in_use(text)

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
        # A missing (None) log-probability stays NaN, so `Probe.finite` sees it; Python's JSON reader accepts NaN
        # and Infinity, which an engine serialising non-finite floats would send.
        return Probe(text=choice.get("text") or "", tokens=tuple(lp.get("tokens") or ()),
                     logprobs=tuple(math.nan if x is None else float(x) for x in (lp.get("token_logprobs") or ())))


    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """POST /v1/embeddings of `texts` with `model` (a pooling engine: spec.engine.task embed); one vector per
        text, in order. Raises EngineError on a non-200 answer or one without a vector for each text."""
        status, text, body = await self._request("POST", "/v1/embeddings", {"model": model, "input": texts})
        if status != 200:
            raise EngineError(status, _message(text, body))
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != len(texts) or not all(
                isinstance(d, dict) and isinstance(d.get("embedding"), list) and d["embedding"] for d in data):
            raise EngineError(status, f"/v1/embeddings answered without one embedding per input: {text[:200]}")
        # OpenAI's answer carries each vector's input position in `index`; without usable indices, answer order.
        if sorted(d.get("index") for d in data if isinstance(d.get("index"), int)) == list(range(len(data))):
            data = sorted(data, key=lambda d: d["index"])
        return [d["embedding"] for d in data]


_REQUESTS = re.compile(r"^vllm:num_requests_(?:running|waiting)(?:\{[^}\n]*\})? ([0-9.eE+-]+|NaN)\s*$", re.MULTILINE)
_LORA_INFO = re.compile(r"^vllm:lora_requests_info\{([^}\n]*)\} ([0-9.eE+-]+)\s*$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_adapters_in_use(text: str) -> frozenset[str] | None:
    """`VllmClient.adapters_in_use` on the text of vLLM's /metrics (Prometheus exposition format)."""
    counts = [float(m.group(1)) for m in _REQUESTS.finditer(text)]
    if not counts:
        return None
    if sum(c for c in counts if c == c) <= 0:
        return frozenset()   # no request at all: the lora info series may be stale (it updates per engine step)
    newest: tuple[float, str] | None = None
    for m in _LORA_INFO.finditer(text):
        stamp = float(m.group(2))
        if newest is None or stamp > newest[0]:
            newest = (stamp, m.group(1))
    if newest is None:
        return None
    labels = dict(_LABEL.findall(newest[1]))
    names = ",".join((labels.get("running_lora_adapters", ""), labels.get("waiting_lora_adapters", "")))
    return frozenset(n.strip() for n in names.split(",") if n.strip())


def _message(text: str, body: object) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    return text[:500]


@dataclass(frozen=True)
class Refusal:
    """One row of a refusal table: a vLLM error whose message matches `pattern` (a case-insensitive regex), or
    whose HTTP status is `status`, means `reason`. Whether it is retried is the loader's (reconciler.OUTCOMES)."""

    reason: Reason
    pattern: str
    status: int | None = None

    def matches(self, err: EngineError) -> bool:
        """Does `err` (its message, or its status when the row names one) fall under this row?"""
        return (self.status is not None and err.status == self.status) or bool(
            re.search(self.pattern, err.message, re.IGNORECASE))


# vLLM's answers to POST /v1/load_lora_adapter, first match wins. Its status codes are not a reliable
# classification (most validation failures are HTTP 400 or 500 alike), so the message decides; the
# messages are vLLM's (vllm/lora/peft_helper.py, vllm/lora/models.py, vllm/entrypoints/openai/serving_models.py).
LOAD_REFUSALS: tuple[Refusal, ...] = (
    Refusal(Reason.RankTooLarge, r"max_lora_rank|greater than max"),
    Refusal(Reason.UnsupportedModulesToSave, r"modules_to_save"),
    Refusal(Reason.TargetModulesNotFound, r"expected target modules"),
    Refusal(Reason.UnsupportedAdapterFeature, r"does not support|not supported"),
    Refusal(Reason.AlreadyLoaded, r"already been loaded"),   # a race with another client: the next pass compares
    Refusal(Reason.AdapterNotFound, r"no adapter found|does not exist", status=404),
    Refusal(Reason.InvalidAdapter, r"error while deserializing|headertoolarge|incomplete metadata|size mismatch"),
)
# vLLM's error answers to the smoke-test completion through a loaded adapter. NaN/Inf log-probabilities
# cannot be serialised: vLLM answers 500 "Out of range float values are not JSON compliant".
PROBE_REFUSALS: tuple[Refusal, ...] = (
    Refusal(Reason.NonFiniteOutput, r"out of range float|not json compliant|\b(nan|inf)\b"),
)


def classify(err: EngineError, table: tuple[Refusal, ...], default: Reason = Reason.LoadFailed) -> Reason:
    """The reason of the first row of `table` that `err` matches, else `default`."""
    return next((row.reason for row in table if row.matches(err)), default)


def classify_load_error(err: EngineError) -> Reason:
    """The reason of a failed load (`LOAD_REFUSALS`; LoadFailed when no row matches)."""
    return classify(err, LOAD_REFUSALS)
