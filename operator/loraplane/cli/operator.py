"""`loraplane operator`: run the controllers (kopf) against the cluster of the current kubeconfig, or
in-cluster. The same as `kopf run -m loraplane.controllers.handlers` with LORAPLANE_* variables set."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from loraplane.builders.settings import BuildSettings


def add_operator_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `loraplane operator`; each defaults to its LORAPLANE_* environment variable (what the
    chart sets), else the BuildSettings default."""
    d = BuildSettings()
    p.add_argument("-n", "--namespace", action="append", default=[],
                   help="watch only this namespace (repeatable); default: $LORAPLANE_NAMESPACES "
                        "(comma-separated), else all namespaces")
    p.add_argument("--image", default=os.environ.get("LORAPLANE_IMAGE", d.image),
                   help="loraplane image for the loader sidecar, router and trainer")
    p.add_argument("--trainer-image", default=os.environ.get("LORAPLANE_TRAINER_IMAGE"),
                   help="trainer image (default: --image)")
    p.add_argument("--engine-image", default=os.environ.get("LORAPLANE_ENGINE_IMAGE", d.engine_image),
                   help="vLLM image of ModelRoutes without spec.engine.image")
    p.add_argument("--artifact-store", default=os.environ.get("LORAPLANE_ARTIFACT_STORE", d.artifact_store),
                   help="where jobs without spec.output.uri write adapters")
    p.add_argument("--hpa-api-version", default=os.environ.get("LORAPLANE_HPA_API_VERSION", d.hpa_api_version),
                   help="autoscaling/v2 (Kubernetes >= 1.23) or autoscaling/v2beta2")
    p.add_argument("--pdb-api-version", default=os.environ.get("LORAPLANE_PDB_API_VERSION", d.pdb_api_version),
                   help="policy/v1 (Kubernetes >= 1.21) or policy/v1beta1")
    p.add_argument("--pod-failure-policy", choices=("true", "false"),
                   default=os.environ.get("LORAPLANE_POD_FAILURE_POLICY", "true").lower(),
                   help="give training Jobs a podFailurePolicy (Kubernetes >= 1.26; false before)")
    p.add_argument("--allow-insecure-http", choices=("true", "false"),
                   default=os.environ.get("LORAPLANE_ALLOW_INSECURE_HTTP", "false").lower(),
                   help="let loaders, fetch-model and trainers fetch plain http:// and loopback sources "
                        "(local clusters only; docs/security.md)")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("LORAPLANE_METRICS_PORT", "8080")),
                   help="port of /metrics and /healthz")
    p.add_argument("--resync-seconds", type=float,
                   default=float(os.environ.get("LORAPLANE_RESYNC_SECONDS", "600")),
                   help="re-reconcile everything this often (writes nothing when nothing changed)")
    p.add_argument("--verbose", action="store_true")


def operator_main(args: argparse.Namespace) -> int:
    """Export the options as LORAPLANE_* variables, register the controllers' kopf handlers and run kopf
    (under uvloop when installed) until it stops; returns 0."""
    import kopf

    if not args.namespace:
        args.namespace = [n for n in os.environ.get("LORAPLANE_NAMESPACES", "").split(",") if n]
    env = {
        "LORAPLANE_IMAGE": args.image, "LORAPLANE_TRAINER_IMAGE": args.trainer_image or "",
        "LORAPLANE_ENGINE_IMAGE": args.engine_image,
        "LORAPLANE_ARTIFACT_STORE": args.artifact_store, "LORAPLANE_HPA_API_VERSION": args.hpa_api_version,
        "LORAPLANE_PDB_API_VERSION": args.pdb_api_version,
        "LORAPLANE_POD_FAILURE_POLICY": args.pod_failure_policy, "LORAPLANE_METRICS_PORT": str(args.metrics_port),
        "LORAPLANE_ALLOW_INSECURE_HTTP": args.allow_insecure_http,
        "LORAPLANE_RESYNC_SECONDS": str(args.resync_seconds), "LORAPLANE_NAMESPACES": ",".join(args.namespace),
    }
    os.environ.update({k: v for k, v in env.items() if v})
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kopf.activities", "kopf.objects", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import loraplane.controllers.handlers  # noqa: F401  (registers the handlers)

    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    run(kopf.operator(standalone=True, namespaces=args.namespace, clusterwide=not args.namespace))
    return 0
