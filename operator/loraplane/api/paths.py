"""Well-known ports and paths inside loraplane's pods: where each program listens and where volumes are mounted.

Builders write these into pod specs and the programs read them as defaults, so both sides must agree. Pods of
an older operator version keep running after an upgrade, so a value here changes only with a migration.
"""

from __future__ import annotations

# --- ports ---------------------------------------------------------------------------------------------------
ENGINE_PORT = 8000      # vLLM's OpenAI server (+ /metrics); vLLM's default `--port`
LOADER_PORT = 8081      # loader sidecar: /status (ReplicaReport), /metrics, /healthz, ENGINE_METRICS_PATH
# vLLM's /metrics, read by the loader over localhost and served on LOADER_PORT: Prometheus scrapes it there, so
# nothing but the route's routers needs to reach ENGINE_PORT, whose unauthenticated routes (/invocations,
# SageMaker's POST /adapters) only the NetworkPolicy guards (docs/security.md).
ENGINE_METRICS_PATH = "/engine/metrics"
ROUTER_PORT = 8080      # router: OpenAI API, /metrics, /healthz
RENDEZVOUS_PORT = 29500  # torchrun's default c10d rendezvous port (multi-node training)

# --- volumes -------------------------------------------------------------------------------------------------
# A `pvc://CLAIM/PATH` URI is read at PVC_ROOT/CLAIM/PATH: each claim is mounted at its own subdirectory.
PVC_ROOT = "/mnt/pvc"
# Verified adapter artifacts, shared by the loader and vLLM at the same path (vLLM loads them by path).
ADAPTER_CACHE_PATH = "/var/cache/loraplane/adapters"
# Base models: the Hugging Face cache (HF_HOME) and models fetched from s3:// / https:// by `fetch-model`.
MODEL_CACHE_PATH = "/models"
HF_HOME = f"{MODEL_CACHE_PATH}/hf"
FETCHED_MODELS_PATH = f"{MODEL_CACHE_PATH}/fetched"
# The trainer's FineTuneJob config (a ConfigMap key mounted under CONFIG_DIR).
CONFIG_DIR = "/etc/loraplane"
TRAINER_CONFIG_KEY = "finetunejob.json"
TRAINER_CONFIG_PATH = f"{CONFIG_DIR}/{TRAINER_CONFIG_KEY}"
# A dataset from a ConfigMap is mounted here; the trainer's local scratch for the adapter before upload.
DATA_CONFIGMAP_ROOT = "/data"
OUTPUT_SCRATCH = "/output"
# Each Secret an Adapter's source.credentialsSecretRef names is mounted read-only (loader container only) at
# ADAPTER_CREDENTIALS_ROOT/<secret name>; the loader reads that adapter's credentials from there per fetch.
ADAPTER_CREDENTIALS_ROOT = "/var/run/secrets/loraplane/adapters"
# The in-cluster ServiceAccount credentials (token, ca.crt, namespace), where Kubernetes clients look for them.
# Engine pods mount them in the loader container only (automountServiceAccountToken is off for the pod).
SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# The route's engine key (a Secret `<route>-engine-key-<route uid>` the operator generates once, key ENGINE_KEY_SECRET_KEY):
# vLLM requires it on /v1/* (its --api-key comes from this env var) and the loader and router send it as
# `Authorization: Bearer`. All three read it from the same env var; unset (local runs) means no key.
ENGINE_API_KEY_ENV = "VLLM_API_KEY"
ENGINE_KEY_SECRET_KEY = "api-key"
# The router's API keys (a Secret) are mounted here.
API_KEYS_MOUNT = "/etc/loraplane/api-keys"
