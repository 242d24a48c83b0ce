"""`loraplane router` / `python -m loraplane.router`: run the OpenAI-compatible router of one ModelRoute, or
(`--gateway`) one endpoint across the ModelRoutes of a namespace (router/gateway.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from loraplane.api.paths import ENGINE_API_KEY_ENV
from loraplane.api.wire.serving import ENGINE_PORT, LOADER_PORT, ROUTER_PORT
from loraplane.api.redaction import install_log_redaction

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the router: its table source (--table or --configmap), its replicas (--replica or
    --replicas-dns), API keys, polling, retry and drain settings (seconds) and its listen address."""
    src = p.add_argument_group("routing table (one of)")
    src.add_argument("--table", type=Path, metavar="FILE",
                     help="ServingTable JSON (e.g. the mounted ConfigMap key serving.json); reloaded on change")
    src.add_argument("--configmap", metavar="NAME",
                     help="watch this ConfigMap's serving.json through the Kubernetes API (faster than a volume)")
    src.add_argument("--gateway", action="store_true",
                     help="gateway mode: serve every public model of the namespace's ModelRoutes (watched "
                          "read-only), each forwarded to its route's router with the client's Authorization; "
                          "no replicas of its own")
    p.add_argument("--route-selector", metavar="KEY=VALUE[,...]",
                   help="with --gateway: only the ModelRoutes with these labels")
    p.add_argument("--namespace", metavar="NS",
                   help="namespace of --configmap or of the --gateway's ModelRoutes (default: the pod's own, "
                        "else 'default')")
    p.add_argument("--kubeconfig", type=Path, metavar="FILE",
                   help="for --configmap outside a pod (default: the service account, else $KUBECONFIG)")
    rep = p.add_argument_group("replicas (one of)")
    rep.add_argument("--replica", action="append", default=[], metavar="ENGINE_URL[,STATUS_URL]",
                     help=f"a vLLM replica (repeatable). STATUS_URL is its loader's /status; default: port "
                          f"{LOADER_PORT} when the engine is on {ENGINE_PORT}, else vLLM's /v1/models; 'none' "
                          "forces /v1/models")
    rep.add_argument("--replicas-dns", metavar="HOST",
                     help=f"headless Service name; every address it resolves to is a replica (vLLM on "
                          f"{ENGINE_PORT}, loader on {LOADER_PORT}); re-resolved every --dns-interval")
    p.add_argument("--dns-interval", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--wake-deployment", metavar="NAME",
                   help="while requests are held for a cold start, scale this Deployment (in --namespace) from 0 "
                        "to 1 replica through its scale subresource (needs get/patch on deployments/scale)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=ROUTER_PORT)
    p.add_argument("--api-keys-file", "--api-keys-dir", dest="api_keys_file", type=Path, metavar="PATH",
                   help="accepted API keys, one per line, or a folder of such files (a mounted Secret); "
                        "clients send Authorization: Bearer <key>. Without it no key is asked")
    p.add_argument("--poll-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often each replica's loader status and vLLM metrics are read")
    p.add_argument("--connect-timeout", type=float, default=3.0, metavar="SECONDS")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="replicas tried for one request when connecting fails (nothing sent yet)")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM, how long requests in flight may take to finish")
    lim = p.add_argument_group("client connection limits (what a client without an API key can hold)")
    lim.add_argument("--max-connections", type=int, default=4096,
                     help="client connections open at once; more are answered 503 and closed")
    lim.add_argument("--max-header-bytes", type=int, default=64 * 1024, metavar="BYTES",
                     help="request line plus headers of one request; more: 431 and the connection closed")
    lim.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="from a request's first byte to the end of its headers; later: 408, closed")
    lim.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="from the end of a request's headers to the end of its body; later: 408, closed")
    lim.add_argument("--idle-timeout", type=float, default=75.0, metavar="SECONDS",
                     help="a keep-alive connection with no request in progress is closed after this long")
    p.add_argument("--access-log", action="store_true",
                   help="one log line per request (model, backend, replica, status, time; never the prompt)")
    p.add_argument("--log-level", default=os.environ.get("LORAPLANE_LOG_LEVEL", "INFO"))


def _configure(args: argparse.Namespace) -> str | None:
    """None if the arguments make sense, else the error to print."""
    if args.gateway:
        if args.table or args.configmap or args.replica or args.replicas_dns or args.wake_deployment:
            return ("--gateway takes its table from the namespace's ModelRoutes and has no replicas: drop --table, "
                    "--configmap, --replica, --replicas-dns and --wake-deployment")
    else:
        if args.route_selector:
            return "--route-selector needs --gateway"
        if bool(args.table) == bool(args.configmap):
            return "give exactly one routing table source: --table FILE or --configmap NAME (or --gateway)"
        if bool(args.replica) == bool(args.replicas_dns):
            return "give the replicas: --replica URL (repeatable) or --replicas-dns HOST, not both"
    if args.poll_interval <= 0 or args.dns_interval <= 0:
        return "--poll-interval and --dns-interval must be > 0"
    if min(args.header_timeout, args.body_timeout, args.idle_timeout) <= 0:
        return "--header-timeout, --body-timeout and --idle-timeout must be > 0 (seconds)"
    if args.max_connections < 1 or args.max_header_bytes < 1024:
        return "--max-connections must be >= 1 and --max-header-bytes >= 1024"
    return None


async def _serve(args: argparse.Namespace) -> int:
    from loraplane.router.replicas import ReplicaPool, parse_replica_arg
    from loraplane.router.auth import ApiKeys
    from loraplane.router.server import Router
    from loraplane.router.service import RouterService
    from loraplane.router.client_protocol import ClientConnection
    from loraplane.router.forward import ForwardingConnection
    from loraplane.router.gateway import parse_route_selector

    try:
        specs = [parse_replica_arg(v) for v in args.replica]
        api_keys = ApiKeys(args.api_keys_file) if args.api_keys_file else None
        selector = parse_route_selector(args.route_selector) if args.route_selector else None
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pool = ReplicaPool(poll_interval=args.poll_interval)
    pool.set_replicas(specs)
    try:
        router = Router(pool, api_keys=api_keys, connect_timeout=args.connect_timeout,
                        # A gateway has no vLLM of its own: no engine key, whatever the environment holds.
                        engine_key=None if args.gateway else os.environ.get(ENGINE_API_KEY_ENV) or None,
                        connection_class=ForwardingConnection if args.gateway else ClientConnection,
                        max_attempts=args.max_attempts, access_log=args.access_log,
                        max_connections=args.max_connections, max_header_bytes=args.max_header_bytes,
                        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                        idle_timeout=args.idle_timeout)
    except ValueError as exc:   # an engine key that cannot be a header value (the key itself is not printed)
        print(f"error: ${ENGINE_API_KEY_ENV}: {exc}", file=sys.stderr)
        return 2
    configmap = gateway = None
    ns = args.namespace or (_SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.exists() else "default")
    if args.configmap:
        configmap = (ns, args.configmap)
    if args.gateway:
        gateway = (ns, selector)
    service = RouterService(router, table_path=args.table, configmap=configmap, kubeconfig=args.kubeconfig,
                            replicas_dns=args.replicas_dns,
                            dns_interval=args.dns_interval, host=args.host, port=args.port,
                            drain_seconds=args.drain_seconds, wake_deployment=args.wake_deployment,
                            wake_namespace=configmap[0] if configmap else args.namespace, gateway=gateway)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    await stop.wait()
    logging.getLogger("loraplane.router").info("stopping: draining requests in flight")
    await service.stop()
    return 0


def router_main(args: argparse.Namespace) -> int:
    """Run the router until SIGTERM/SIGINT, then drain; returns 2 for contradictory or invalid options (or
    unreadable API keys), else 0. Uses uvloop when installed."""
    problem = _configure(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    configure_logging(args.log_level)
    try:
        import uvloop  # a faster event loop when installed (kopf[uvloop], uvicorn[standard])
    except ImportError:
        return asyncio.run(_serve(args))
    return uvloop.run(_serve(args))


def configure_logging(level: str) -> None:
    """The router's log at `level`, every line scrubbed of credentials (api.redaction): errors quote replica
    URLs and, with router.logPrompts, request bodies."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_redaction()


def main(argv: list[str] | None = None) -> int:
    """`python -m loraplane.router [ARGS]`: the same program as `loraplane router`, without the CLI package."""
    parser = argparse.ArgumentParser(prog="python -m loraplane.router", description=__doc__)
    add_router_arguments(parser)
    return router_main(parser.parse_args(argv))
