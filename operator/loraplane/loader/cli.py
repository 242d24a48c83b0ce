"""`loraplane loader` / `python -m loraplane.loader`: wire the table source, cache, engine client, control loop,
HTTP server and report sinks together."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from loraplane.api.redaction import install_log_redaction
from loraplane.api.paths import (ADAPTER_CACHE_PATH, ADAPTER_CREDENTIALS_ROOT, ENGINE_API_KEY_ENV, LOADER_PORT,
                                 PVC_ROOT)

log = logging.getLogger("loraplane.loader")
DESCRIPTION = ("The adapter loader beside a vLLM replica: keeps the replica's LoRA adapters equal to its ModelRoute's "
               "serving table (fetch, verify, check compatibility, load, smoke-test) and reports what is loaded "
               "(docs/loader.md).")


def add_loader_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the loader sidecar: its table source (--table or --configmap), vLLM's URL, the adapter
    cache, the smoke test and retry settings, and its HTTP port."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", type=Path, help="serving table JSON file (local runs); reloaded when it changes")
    src.add_argument("--configmap", help="ConfigMap holding serving.json (in a cluster), e.g. ROUTE-serving")
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                   help="namespace of the ConfigMap and the Pod (default: $POD_NAMESPACE or default)")
    p.add_argument("--kubeconfig", help="use this kubeconfig instead of the in-cluster service account")
    p.add_argument("--pod-name", default=os.environ.get("POD_NAME"),
                   help="this replica's Pod: the report's replica name (default: $POD_NAME); the operator reads "
                        "the report from /status and annotates the Pod (the loader has no write access)")
    p.add_argument("--vllm-url", default="http://127.0.0.1:8000", help="the vLLM server beside the loader")
    p.add_argument("--cache-dir", type=Path, default=Path(ADAPTER_CACHE_PATH),
                   help="where verified adapter artifacts are kept (shared with vLLM at the same path)")
    p.add_argument("--cache-max-bytes", type=int, default=20 * 1024**3,
                   help="evict least-recently-used artifacts not in use above this size")
    p.add_argument("--pvc-root", default=PVC_ROOT, help="where pvc://CLAIM/... sources are mounted")
    add_fetch_policy_arguments(p)
    p.add_argument("--max-artifact-bytes", type=int, default=8 * 1024**3,
                   help="largest unpacked adapter (and largest file in it) accepted, in bytes; also capped by "
                        "--cache-max-bytes (docs/security.md)")
    p.add_argument("--max-artifact-files", type=int, default=10_000,
                   help="most files and directories one adapter archive or directory may hold")
    p.add_argument("--max-header-bytes", type=int, default=8 * 1024**2,
                   help="largest adapter safetensors header the gate reads, in bytes")
    p.add_argument("--credentials-root", default=ADAPTER_CREDENTIALS_ROOT,
                   help="where each adapter's credentials Secret is mounted, one folder per Secret name; `none`: "
                        "fetch every adapter with this process's environment (local runs)")
    p.add_argument("--model-dir", help="the base model's local directory (default: the table's modelPath, then "
                                       "the Hugging Face cache)")
    p.add_argument("--engine-task", choices=("generate", "embed"), default="generate",
                   help="the route's spec.engine.task: embed is a pooling (embedding) engine without LoRA, warmed "
                        "up with one /v1/embeddings request; adapters are refused on it")
    p.add_argument("--max-lora-rank", type=int, help="override the table's maxLoraRank (must equal vLLM's flag)")
    p.add_argument("--no-smoke-test", dest="smoke_test", action="store_false",
                   help="do not probe each adapter after loading (then a no-op adapter is reported Ready)")
    p.add_argument("--probe-prompt", default=None, help="prompt of the smoke test (greedy, compared to the base)")
    p.add_argument("--probe-tokens", type=int, default=8)
    p.add_argument("--max-attempts", type=int, default=5, help="load attempts before an adapter is Failed")
    p.add_argument("--backoff-seconds", type=float, default=1.0, help="first retry delay; doubles per attempt")
    p.add_argument("--resync-seconds", type=float, default=1.0,
                   help="how often vLLM's health and adapter list are checked (restart detection)")
    p.add_argument("--drain-seconds", type=float, default=None,
                   help="(default 5) an adapter that left the table while serving stays loaded at least this long, then until "
                        "vLLM runs no request with it (at most the route's router.timeoutSeconds more)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=LOADER_PORT, help="/status, /metrics, /healthz")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))


def add_fetch_policy_arguments(p: argparse.ArgumentParser) -> None:
    """--allow-insecure-http, shared by the loader, `fetch-model` and the trainer: plain http:// artifact URLs
    and loopback addresses (the chart's allowInsecureHttp; local clusters and tests only)."""
    p.add_argument("--allow-insecure-http", action="store_true",
                   help="also fetch plain http:// URLs and from loopback addresses (local clusters and tests; "
                        "https and public or private addresses otherwise)")


def loader_main(args: argparse.Namespace) -> int:
    """Run the loader until SIGTERM/SIGINT; returns 2 when --configmap is given outside a pod without
    --kubeconfig, else 0."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()   # log lines quote adapter URIs and store errors
    if args.table is None and not args.kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        print("error: --configmap reads the Kubernetes API: run in a pod (in-cluster service account) or pass "
              "--kubeconfig; for local runs use --table FILE", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


def loader_fetch_policy(args: argparse.Namespace):
    """The loader's FetchPolicy (storage.fetchers.base): plain http with --allow-insecure-http; local `/PATH` and
    `file://` sources only with a local table (--table: `loraplane run`), since in a cluster the loader's file
    system holds other Adapters' cached weights and credentials; the credentials root is never a source (the
    cache adds its own root)."""
    from loraplane.storage.fetchers import FetchPolicy

    private = () if args.credentials_root == "none" else (str(args.credentials_root),)
    return FetchPolicy(allow_insecure_http=args.allow_insecure_http, allow_local_paths=args.table is not None,
                       private_roots=private)


async def serve(args: argparse.Namespace, started: asyncio.Event | None = None) -> None:
    """Wire cache, vLLM client, Loader, HTTP server and table source (file or ConfigMap watch) and run them
    until a signal or until the reconcile loop or the table source stops; sets `started` once listening."""
    import aiohttp
    from aiohttp import web

    from loraplane.storage.cache import ArtifactCache
    from loraplane.loader.engine import VllmClient
    from loraplane.loader.reconciler import DEFAULT_PROBE_PROMPT, DRAIN_SECONDS, Loader
    from loraplane.loader.server import make_app
    from loraplane.loader.sources import KubeBinding, watch_file

    from loraplane.storage.archive import ArtifactLimits

    limits = ArtifactLimits(args.max_artifact_files, args.max_artifact_bytes, args.max_artifact_bytes)
    cache = ArtifactCache(args.cache_dir, args.cache_max_bytes, pvc_root=args.pvc_root, limits=limits,
                          policy=loader_fetch_policy(args))
    kube = None
    if args.configmap:
        kube = KubeBinding.from_environment(args.namespace, args.configmap, args.kubeconfig)
    async with aiohttp.ClientSession() as session:
        # The route's engine key (the pod's env, from the operator's Secret); unset locally: keyless vLLM.
        engine = VllmClient(args.vllm_url, session, api_key=os.environ.get(ENGINE_API_KEY_ENV) or None)
        loader = Loader(engine, cache, replica=args.pod_name or socket.gethostname(),
                        model_dir=args.model_dir, max_lora_rank=args.max_lora_rank, smoke_test=args.smoke_test,
                        probe_prompt=args.probe_prompt or DEFAULT_PROBE_PROMPT, probe_tokens=args.probe_tokens,
                        max_attempts=args.max_attempts, backoff_base=args.backoff_seconds,
                        resync=args.resync_seconds, drain_seconds=DRAIN_SECONDS if args.drain_seconds is None else args.drain_seconds,
                        max_header_bytes=args.max_header_bytes, engine_task=args.engine_task,
                        credentials_root=None if args.credentials_root == "none" else args.credentials_root)
        loader.metrics.cache_bytes.set(cache.total_bytes())

        def on_error(message: str) -> None:
            loader.metrics.table_errors.inc()
            log.error("%s (keeping the previous table)", message)

        runner = web.AppRunner(make_app(loader), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        log.info("loader for %s on :%d, engine %s", args.table or args.configmap, args.port, args.vllm_url)
        source = (watch_file(args.table, loader.set_table, on_error) if args.table
                  else kube.watch_table(loader.set_table, on_error))
        tasks = [asyncio.create_task(loader.run(), name="reconcile"), asyncio.create_task(source, name="table")]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        if started:
            started.set()
        try:
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not waiter and t.exception():
                    log.error("%s stopped: %r", t.get_name(), t.exception())
        finally:
            for t in [*tasks, waiter]:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if kube:
                await kube.close()
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """`python -m loraplane.loader [ARGS]`: the same program as `loraplane loader`, without the CLI package."""
    parser = argparse.ArgumentParser(prog="python -m loraplane.loader", description=DESCRIPTION)
    add_loader_arguments(parser)
    return int(loader_main(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
