"""The operator-level spec policy: what a user who may create FineTuneJobs and ModelRoutes may make the cluster run.

A FineTuneJob or ModelRoute author chooses images, vLLM flags, environment entries and (FineTuneJob) the
ServiceAccount of pods the operator creates in their namespace. Without a policy that is "anything, as anyone in
the namespace": any image, any Secret through `valueFrom.secretKeyRef`, `--trust-remote-code` (vLLM executes the
model repository's Python). The platform team sets the policy once (chart values `operator.policy.*` -> the
operator's LORAPLANE_* env -> `OperatorSettings` -> `BuildSettings.policy`); the controllers refuse a spec that
breaks it (Ready=False, reason PolicyViolation, naming the field and the setting that would allow it; no child is
created or changed) and `loraplane validate --policy values.yaml` reports the same before an apply.

The rules (docs/security.md, "Policy: what creating each kind grants"):
- images: `spec.image` (FineTuneJob), `spec.engine.image` and `spec.router.image` (ModelRoute) must be in the
  repository of one of the operator's own images (any tag or digest of it), or match a glob of `allowed_images`
  (`fnmatch`, case-sensitive; `*` also matches `/`, so `registry.example.com/ml/*` allows that whole tree).
- vLLM flags: every flag in `spec.engine.extraArgs` must be in `allowed_engine_args` (default: `DEFAULT_ENGINE_ARGS`,
  tuning flags that neither load code, read local files nor open listeners). `--trust-remote-code` also needs
  `allow_trust_remote_code`. Flags the operator sets itself (--host, --port, --model, the LoRA settings) are never
  allowed: a later copy would override them.
- env names: every name in `spec.engine.env` must match a glob of `allowed_engine_env` (default:
  `DEFAULT_ENGINE_ENV`, logging and thread tuning); names the operator sets (`ENGINE_OWNED_ENV`: VLLM_API_KEY, ...)
  and `ENGINE_ENV_NEVER` (code loading, endpoints/proxies/CAs, VLLM_SERVER_DEV_MODE) are never allowed.
- env: `valueFrom.secretKeyRef` in `spec.engine.env` may name only the route's own `baseModel.credentialsSecretRef`
  or a Secret matching a glob of `allowed_env_secrets`; variables that load code or configuration from a path
  (`DENIED_ENV_NAMES`: LD_PRELOAD, PYTHONPATH, ...) are never allowed.
- ServiceAccount: a FineTuneJob's `spec.serviceAccountName` must match a glob of `allowed_service_accounts`
  (default none: the trainer runs as the ServiceAccount the operator creates for it, which holds no Role).
- Prometheus: a ModelRoute's `spec.autoscaling.prometheusAddress` (KEDA's operator GETs it, from its own place in
  the cluster's network, every polling interval) must match a glob of `allowed_prometheus_addresses` (default none:
  unset, the KEDA trigger asks the chart's default address), and be a plain `http(s)://host[:port][/path]` URL
  with no userinfo, query or fragment, whatever the globs say (a `#` would cut off the query KEDA appends).
- trust_remote_code: the trainer never passes it (transformers' default, False); there is no spec field for it.
- pod settings (FineTuneJob spec.pod, ModelRoute spec.engine.pod / spec.router.pod; api/pods.py): the security
  context may not loosen the restricted profile (runAsNonRoot false, UID 0, privileged, allowPrivilegeEscalation,
  capabilities.add beyond NET_BIND_SERVICE, Unconfined seccomp/AppArmor, Unmasked procMount, a writable root
  filesystem, SELinux user/role or a non-container type) whatever the policy says; priorityClassName and
  runtimeClassName must match a glob of `allowed_priority_classes` / `allowed_runtime_classes` (default none:
  the chart's childPods choose); a label or annotation key the operator or Kubernetes sets on the pod is never
  allowed, and keys in the reserved domains (loraplane.io, kubernetes.io, k8s.io) need `allowed_pod_metadata_keys`.
- model cache: `spec.engine.modelCache.hostPath` must match a glob of `allowed_model_cache_host_paths` (default
  none: a hostPath is the node's filesystem, shared with every pod that mounts it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from loraplane.api.common import Resource
from loraplane.api.finetunejob import FineTuneJob
from loraplane.api.keys import (COMPONENT_LABEL, FINETUNEJOB_LABEL, HASH_ANNOTATION, PRODUCED_BY_ANNOTATION,
                                REPORT_ANNOTATION, ROUTE_LABEL, ROUTER_LABEL)
from loraplane.api.modelroute import ModelRoute
from loraplane.api.pods import (POD_COMPONENTS, ChildPodSettings, ContainerSecurityContextSpec,
                                PodSecurityContextSpec, PodSettings)
from loraplane.api.paths import ENGINE_API_KEY_ENV
from loraplane.builders.common import KUBERNETES_POD_KEYS, SCRATCH_ENV
from loraplane.storage.uri import CREDENTIAL_ENV

# vLLM flags a ModelRoute may pass in spec.engine.extraArgs without the platform team allowing more: scheduling,
# memory and caching knobs of the engine's own work. Left out on purpose: anything that loads code or a plugin
# (--trust-remote-code, --tool-parser-plugin, --logits-processors, --worker-cls), reads a local path or URL
# (--chat-template, --allowed-local-media-path, --download-dir, --config, --generation-config,
# --lora-modules, --tokenizer, --model-loader-extra-config), opens or changes a listener or its auth (--host,
# --port, --api-key, --ssl-*, --root-path, --middleware, --enable-auto-tool-choice), and every flag the operator
# sets (ENGINE_OWNED_ARGS).
DEFAULT_ENGINE_ARGS: tuple[str, ...] = (
    "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
    "--no-enable-chunked-prefill", "--max-num-seqs", "--max-num-batched-tokens",
    "--block-size", "--kv-cache-dtype", "--enforce-eager", "--seed", "--max-logprobs",
    "--disable-log-stats", "--enable-log-requests", "--scheduling-policy",
    "--cpu-offload-gb", "--max-cudagraph-capture-size", "--lora-dtype",
    "--fully-sharded-loras", "--disable-sliding-window", "--pipeline-parallel-size", "--quantization",
    "--num-gpu-blocks-override", "--uvicorn-log-level", "--disable-uvicorn-access-log",
)
TRUST_REMOTE_CODE = "--trust-remote-code"
# Flags engine_pod.engine_args writes: an extraArgs copy would override them (a second listener, another model,
# other LoRA limits than the loader's gate checks), so no policy allows them.
ENGINE_OWNED_ARGS: frozenset[str] = frozenset({
    "--model", "--served-model-name", "--host", "--port", "--enable-lora", "--max-loras", "--max-lora-rank",
    "--max-cpu-loras", "--dtype", "--tensor-parallel-size", "--max-model-len", "--gpu-memory-utilization",
    "--revision", "--lora-modules",
})
# Environment variables of spec.engine.env that make the vLLM container load code or configuration from a path
# the route's author controls (a PVC its baseModel.uri mounts): a shared library, Python modules, a startup or
# breakpoint hook, a warnings category (imported by name), a logging dictConfig (instantiates classes), pickle
# deserialisation. Refused whatever the policy says: an allowed image does not make them safe.
# Kept for callers and docs; ENGINE_ENV_NEVER (below) holds these and more.
DENIED_ENV_NAMES: frozenset[str] = frozenset({
    "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
    "PYTHONBREAKPOINT", "PYTHONWARNINGS", "PYTHONPLATLIBDIR", "PYTHONINSPECT", "VLLM_LOGGING_CONFIG_PATH",
    "VLLM_ALLOW_INSECURE_SERIALIZATION",
})
# Environment variables spec.engine.env may set without the platform team allowing more (names, not globs): vLLM's
# logging, stats and CPU-backend tuning and the OpenMP/tokenizers thread counts (vllm/envs.py of vLLM 0.32). Each
# only changes how much or how verbosely vLLM works: none loads code or a plugin, names a path, a URL, a proxy or
# a CA, or changes authentication or which routes vLLM serves. Everything else needs operator.policy.allowedEngineEnv.
DEFAULT_ENGINE_ENV: tuple[str, ...] = (
    "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_PREFIX", "VLLM_LOG_STATS_INTERVAL", "VLLM_NO_USAGE_STATS",
    "VLLM_DO_NOT_TRACK", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
)
# Names the operator sets on the vLLM container (engine_pod.engine_env: the engine key, runtime LoRA loading, the
# HF cache, HOME/TMPDIR on scratch, the base model's credentials). A user entry would replace the operator's: an
# empty VLLM_API_KEY switches vLLM's key check off, VLLM_ALLOW_RUNTIME_LORA_UPDATING=False breaks the loader.
ENGINE_OWNED_ENV: frozenset[str] = frozenset({
    ENGINE_API_KEY_ENV, "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "HF_HOME", *SCRATCH_ENV, *CREDENTIAL_ENV,
})
# Globs of names no setting allows, even when a glob of allowed_engine_env matches them (`VLLM_*`, `*`):
# - the operator's own names (ENGINE_OWNED_ENV) and DENIED_ENV_NAMES;
# - names that make vLLM or a library it loads import or run code from a path or a name the author chooses
#   (SageMaker's CUSTOM_SCRIPT_FILENAME / SAGEMAKER_* of the bundled model_hosting_container_standards, every
#   PYTHON* and LD_*, VLLM_PLUGINS, cache and config roots that hold pickled or compiled code: VLLM_CACHE_ROOT,
#   VLLM_CONFIG_ROOT, TRITON_CACHE_DIR, TORCHINDUCTOR_*, HF_MODULES_CACHE, XDG_*, ...);
# - VLLM_SERVER_DEV_MODE: serves /collective_rpc, /update_weights, /sleep outside /v1, never key-checked;
# - endpoints, proxies and CAs: with baseModel.credentialsSecretRef vLLM would send the Secret (HF_TOKEN, AWS_*)
#   to the author's server (HF_ENDPOINT, *_PROXY, SSL_CERT_FILE, REQUESTS_CA_BUNDLE, AWS_ENDPOINT_URL*, ...).
ENGINE_ENV_NEVER: tuple[str, ...] = (
    *sorted(ENGINE_OWNED_ENV), *sorted(DENIED_ENV_NAMES), "VLLM_SERVER_DEV_MODE",
    "PYTHON*", "LD_*", "SAGEMAKER_*", "CUSTOM_SCRIPT*", "XDG_*", "VLLM_PLUGINS", "VLLM_*PLUGIN*", "VLLM_CACHE_ROOT",
    "VLLM_CONFIG_ROOT", "VLLM_ASSETS_CACHE*", "VLLM_RPC_BASE_PATH", "VLLM_USE_MODELSCOPE", "MODELSCOPE_*",
    "VLLM_*_PATH", "VLLM_*_DIR", "VLLM_*_URL", "VLLM_*_ENDPOINT*", "VLLM_*INSECURE*", "VLLM_*SERIALIZ*",
    "TRITON_*", "TORCHINDUCTOR_*", "TORCH_HOME", "TORCH_EXTENSIONS_DIR", "CUDA_CACHE_PATH", "HF_*", "HUGGINGFACE_*",
    "TRANSFORMERS_*", "*_PROXY", "*_proxy", "SSL_CERT_*", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_*",
    "AWS_*", "GOOGLE_*", "AZURE_*", "KUBERNETES_*", "PATH",
)
# Where each setting is written, for the messages (chart value, then the operator's environment variable).
SETTING_IMAGES = "operator.policy.allowedImages (LORAPLANE_ALLOWED_IMAGES)"
SETTING_ENGINE_ARGS = "operator.policy.allowedEngineArgs (LORAPLANE_ALLOWED_ENGINE_ARGS)"
SETTING_TRUST = "operator.policy.allowTrustRemoteCode (LORAPLANE_ALLOW_TRUST_REMOTE_CODE)"
SETTING_ENGINE_ENV = "operator.policy.allowedEngineEnv (LORAPLANE_ALLOWED_ENGINE_ENV)"
SETTING_SECRETS = "operator.policy.allowedEnvSecrets (LORAPLANE_ALLOWED_ENV_SECRETS)"
SETTING_ACCOUNTS = "operator.policy.allowedServiceAccounts (LORAPLANE_ALLOWED_SERVICE_ACCOUNTS)"
SETTING_PROMETHEUS = "operator.policy.allowedPrometheusAddresses (LORAPLANE_ALLOWED_PROMETHEUS_ADDRESSES)"
SETTING_PRIORITY = "operator.policy.allowedPriorityClasses (LORAPLANE_ALLOWED_PRIORITY_CLASSES)"
SETTING_RUNTIME = "operator.policy.allowedRuntimeClasses (LORAPLANE_ALLOWED_RUNTIME_CLASSES)"
SETTING_POD_METADATA = "operator.policy.allowedPodMetadataKeys (LORAPLANE_ALLOWED_POD_METADATA_KEYS)"
SETTING_HOST_PATHS = "operator.policy.allowedModelCacheHostPaths (LORAPLANE_ALLOWED_MODEL_CACHE_HOST_PATHS)"
SETTING_RESTRICTED = "none: the restricted Pod Security profile is kept on every pod, docs/security.md"
# The `setting` of a Violation no policy setting can allow starts with this; the rest says what to do instead.
NO_SETTING = "none:"
# Label and annotation keys the operator sets on its pods (builders: base_labels, the selector labels, the
# prometheus.io scrape annotations, the spec hash and the replica report): a pod setting never replaces them
# (they select the pods, group replicas, carry the report).
OPERATOR_POD_METADATA_KEYS = frozenset({
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
    "app.kubernetes.io/managed-by", "prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path",
    FINETUNEJOB_LABEL, COMPONENT_LABEL, ROUTER_LABEL, ROUTE_LABEL, HASH_ANNOTATION, REPORT_ANNOTATION,
    PRODUCED_BY_ANNOTATION,
})
# Key prefixes (domains) reserved for loraplane and Kubernetes: a kind's pod setting may use them only when the
# platform team allows the key (allowed_pod_metadata_keys). `kueue.x-k8s.io/...` is not in them.
RESERVED_METADATA_DOMAINS = ("loraplane.io", "kubernetes.io", "k8s.io")
# Pod Security `restricted`: the one capability a container may add; `baseline`: the SELinux types allowed.
ALLOWED_ADD_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
SELINUX_TYPES = frozenset({"container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
# A token of extraArgs that is a value, not a flag, although it starts with "-": a negative number.
_NUMBER = re.compile(r"^-\d+(\.\d+)?([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class SpecPolicy:
    """What FineTuneJob and ModelRoute specs may ask for beyond the operator's defaults (see the module's
    docstring). Globs are `fnmatch` patterns, matched case-sensitively on the whole string."""

    allowed_images: tuple[str, ...] = ()
    allowed_engine_args: tuple[str, ...] = DEFAULT_ENGINE_ARGS
    allow_trust_remote_code: bool = False
    allowed_env_secrets: tuple[str, ...] = ()
    allowed_engine_env: tuple[str, ...] = DEFAULT_ENGINE_ENV
    allowed_service_accounts: tuple[str, ...] = ()
    allowed_prometheus_addresses: tuple[str, ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()
    allowed_runtime_classes: tuple[str, ...] = ()
    allowed_pod_metadata_keys: tuple[str, ...] = ()
    allowed_model_cache_host_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Violation:
    """One field of a spec the policy refuses: `field` (e.g. spec.engine.extraArgs[2]), what it asks for and
    the policy setting that would allow it."""

    field: str
    problem: str
    setting: str

    @property
    def unconditional(self) -> bool:
        """True when no policy setting allows it (`setting` starts with NO_SETTING): refused with every policy,
        the default one included, so `loraplane validate`/`render` refuse it without the chart's values too."""
        return self.setting.startswith(NO_SETTING)

    def __str__(self) -> str:
        if self.unconditional:
            instead = self.setting.removeprefix(NO_SETTING).strip()
            return f"{self.field}: {self.problem}; refused whatever the operator's policy says ({instead})"
        return f"{self.field}: {self.problem}; the operator's policy does not allow it (setting: {self.setting})"


def image_repository(ref: str) -> str:
    """The repository of an image reference, without its tag and digest: `reg:5000/a/b:1@sha256:..` ->
    `reg:5000/a/b`."""
    name = ref.split("@", 1)[0]
    head, sep, tail = name.rpartition(":")
    return head if sep and "/" not in tail else name


def _glob_match(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(value, p) for p in patterns)


def flag_name(token: str) -> str:
    """The flag of an extraArgs token as vLLM's parser reads it: the part before `=`, with `_` as `-`
    (`--max_num_seqs=8` -> `--max-num-seqs`)."""
    name = token.split("=", 1)[0]
    return name[:2] + name[2:].replace("_", "-") if name.startswith("--") else name


def image_allowed(image: str, own_images: tuple[str, ...], policy: SpecPolicy) -> bool:
    """True when `image` is in the repository of one of `own_images` (the operator's images) or matches a glob
    of `policy.allowed_images`."""
    return image_repository(image) in {image_repository(i) for i in own_images} or _glob_match(
        image, policy.allowed_images)


def engine_arg_violations(args: list[str], policy: SpecPolicy, where: str = "spec.engine.extraArgs"
                          ) -> list[Violation]:
    """The flags of `args` (vLLM's extraArgs) the policy refuses. A token starting with `-` (other than a
    negative number) is a flag; others are values of the flag before them; a value with no flag before it is
    refused (vLLM would read it as something else)."""
    allowed = {flag_name(a) for a in policy.allowed_engine_args} - ENGINE_OWNED_ARGS
    if policy.allow_trust_remote_code:
        allowed.add(TRUST_REMOTE_CODE)
    out: list[Violation] = []
    seen_flag = False
    for i, token in enumerate(args):
        if not token.startswith("-") or _NUMBER.match(token):
            if token.startswith("@"):   # argparse's fromfile syntax, wherever a parser enables it: arguments from a file
                out.append(Violation(f"{where}[{i}]", f"{token!r} would read arguments from a file",
                                     SETTING_ENGINE_ARGS))
            elif not seen_flag:
                out.append(Violation(f"{where}[{i}]", f"{token!r} is not a flag (extraArgs must start with one)",
                                     SETTING_ENGINE_ARGS))
            continue
        seen_flag = True
        name = flag_name(token)
        if name in allowed:
            continue
        if name in ENGINE_OWNED_ARGS:
            problem = f"{name} is set by the operator from the spec (spec.engine and spec.baseModel fields)"
            out.append(Violation(f"{where}[{i}]", problem, "none: use the spec's own field"))
        elif name == TRUST_REMOTE_CODE:
            out.append(Violation(f"{where}[{i}]", f"{name} runs the model repository's Python code in vLLM",
                                 SETTING_TRUST))
        else:
            out.append(Violation(f"{where}[{i}]", f"vLLM flag {name} is not in the allowed list", SETTING_ENGINE_ARGS))
    return out


def engine_env_name_violations(name: str, policy: SpecPolicy, where: str) -> list[Violation]:
    """The violation (zero or one) of an env entry NAMED `name` in the vLLM container's spec.engine.env: a name the
    operator sets or one of ENGINE_ENV_NEVER (code loading, endpoints, proxies, CAs, dev routes) is refused
    whatever the policy says; any other name must match a glob of `policy.allowed_engine_env` (default:
    DEFAULT_ENGINE_ENV). Case-sensitive, as the kernel and Python's os.environ are."""
    if name in ENGINE_OWNED_ENV:
        return [Violation(where, f"{name} is set by the operator on the vLLM container (engine key, runtime LoRA "
                          "loading, caches, credentials)", "none: the operator owns it")]
    if _glob_match(name, ENGINE_ENV_NEVER) or _glob_match(name.upper(), ENGINE_ENV_NEVER):
        return [Violation(where, f"{name} could make vLLM run code the author chooses, serve unauthenticated "
                          "routes, or send credentials to another endpoint", "none: bake it into an allowed image")]
    if _glob_match(name, policy.allowed_engine_env):
        return []
    return [Violation(where, f"environment variable {name} is not in the allowed list", SETTING_ENGINE_ENV)]


def _env_violations(env: list[dict], own_secrets: set[str], policy: SpecPolicy, where: str) -> list[Violation]:
    out = []
    for i, entry in enumerate(env):
        if not isinstance(entry, dict):
            continue
        name = entry.get("name")
        if isinstance(name, str):
            out += engine_env_name_violations(name, policy, f"{where}[{i}].name")
        source = entry.get("valueFrom")   # typed by api.common.EnvVar; a dict here all the same, never trusted
        ref = (source.get("secretKeyRef") if isinstance(source, dict) else None) or {}
        secret = ref.get("name") if isinstance(ref, dict) else None
        if not ref:
            continue
        if isinstance(secret, str) and (secret in own_secrets or _glob_match(secret, policy.allowed_env_secrets)):
            continue
        out.append(Violation(f"{where}[{i}].valueFrom.secretKeyRef", f"reads Secret {secret!r}, which is not "
                             "the route's own baseModel.credentialsSecretRef", SETTING_SECRETS))
    return out


def prometheus_address_violations(address: str, policy: SpecPolicy,
                                  where: str = "spec.autoscaling.prometheusAddress") -> list[Violation]:
    """The violation (zero or one) of a KEDA Prometheus address: the keda-operator GETs
    `<address>/api/v1/query?query=...` from its own network position, so an address is a request the route's
    author makes KEDA send (blind SSRF: a metadata service, an internal API). It must be an http(s) URL with a
    host and no userinfo, query or fragment (a `#` would make the rest a fragment and the request go to the
    author's path as written), and match a glob of `policy.allowed_prometheus_addresses`."""
    try:
        parts = urlsplit(address)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None \
            or parts.password is not None or parts.query or parts.fragment or "#" in address or "?" in address \
            or any(c.isspace() or ord(c) < 32 for c in address):
        return [Violation(where, f"{address!r} is not an http(s)://host[:port][/path] URL without userinfo, query "
                          "or fragment", "none: write the Prometheus base URL")]
    if _glob_match(address, policy.allowed_prometheus_addresses):
        return []
    return [Violation(where, f"KEDA's operator would query {address!r}, which is not an allowed Prometheus "
                      "address (unset: the default address)", SETTING_PROMETHEUS)]
def _security_violations(ctx: PodSecurityContextSpec | ContainerSecurityContextSpec | None, where: str
                         ) -> list[Violation]:
    """The values of a pod or container securityContext override that loosen the restricted profile."""
    if ctx is None:
        return []
    out: list[Violation] = []

    def refuse(field: str, problem: str) -> None:
        out.append(Violation(f"{where}.{field}", problem, SETTING_RESTRICTED))

    if ctx.run_as_non_root is False:
        refuse("runAsNonRoot", "false would let the pods run as root")
    if ctx.run_as_user == 0:
        refuse("runAsUser", "UID 0 is root")
    for field, profile in (("seccompProfile", ctx.seccomp_profile), ("appArmorProfile", ctx.app_armor_profile)):
        if profile is not None and profile.type == "Unconfined":
            refuse(f"{field}.type", "Unconfined removes the kernel's syscall/MAC confinement")
    if (se := ctx.se_linux_options) is not None:
        if se.user or se.role:
            refuse("seLinuxOptions", "only seLinuxOptions.level and a container_* type may be set (Pod Security "
                                     "baseline)")
        if se.type and se.type not in SELINUX_TYPES:
            refuse("seLinuxOptions.type", f"{se.type!r} is not one of {', '.join(sorted(SELINUX_TYPES))}")
    if isinstance(ctx, ContainerSecurityContextSpec):
        if ctx.privileged:
            refuse("privileged", "a privileged container has the node's devices and capabilities")
        if ctx.allow_privilege_escalation:
            refuse("allowPrivilegeEscalation", "true lets setuid binaries gain privileges")
        if ctx.read_only_root_filesystem is False:
            refuse("readOnlyRootFilesystem", "false makes the image's filesystem writable (the pods write only to "
                                             "their volumes)")
        if ctx.proc_mount == "Unmasked":
            refuse("procMount", "Unmasked exposes the host's /proc paths")
        if ctx.capabilities is not None:
            for i, cap in enumerate(ctx.capabilities.add):
                if cap.upper().removeprefix("CAP_") not in ALLOWED_ADD_CAPABILITIES:
                    refuse(f"capabilities.add[{i}]", f"capability {cap!r} (only NET_BIND_SERVICE may be added)")
    return out


def metadata_key_reserved(key: str) -> bool:
    """True when `key`'s prefix is in (or under) a domain of RESERVED_METADATA_DOMAINS, except Kubernetes'
    recommended app.kubernetes.io labels (part-of, version, ...: the ones the operator sets are its own, refused
    by OPERATOR_POD_METADATA_KEYS)."""
    prefix = key.rpartition("/")[0]
    if prefix == "app.kubernetes.io":
        return False
    return any(prefix == d or prefix.endswith(f".{d}") for d in RESERVED_METADATA_DOMAINS)


def pod_settings_violations(pod: PodSettings | None, where: str, policy: SpecPolicy) -> list[Violation]:
    """What a kind's pod settings (`where`: spec.pod, spec.engine.pod, spec.router.pod) ask for that the policy
    refuses: a loosened security context, a priority or runtime class not allowed, a label or annotation the
    operator or Kubernetes owns or in a reserved domain without allowed_pod_metadata_keys."""
    if pod is None:
        return []
    out = [*_security_violations(pod.security_context, f"{where}.securityContext"),
           *_security_violations(pod.container_security_context, f"{where}.containerSecurityContext")]
    if pod.priority_class_name and not _glob_match(pod.priority_class_name, policy.allowed_priority_classes):
        out.append(Violation(f"{where}.priorityClassName", f"PriorityClass {pod.priority_class_name!r} (it decides "
                             "which pods are preempted) is not in the allowed list", SETTING_PRIORITY))
    if pod.runtime_class_name and not _glob_match(pod.runtime_class_name, policy.allowed_runtime_classes):
        out.append(Violation(f"{where}.runtimeClassName", f"RuntimeClass {pod.runtime_class_name!r} (it decides the "
                             "pods' isolation) is not in the allowed list", SETTING_RUNTIME))
    for kind, keys in (("labels", pod.labels), ("annotations", pod.annotations)):
        for key in keys:
            field = f"{where}.{kind}[{key}]"
            if key in OPERATOR_POD_METADATA_KEYS or key in KUBERNETES_POD_KEYS:
                out.append(Violation(field, f"{key} is set by the operator or Kubernetes on its pods (selectors, "
                                     "reports)", "none: the operator owns it"))
            elif metadata_key_reserved(key) and not _glob_match(key, policy.allowed_pod_metadata_keys):
                out.append(Violation(field, f"{key} is in a domain reserved for loraplane and Kubernetes",
                                     SETTING_POD_METADATA))
    return out


def chart_pod_settings_problems(pod: PodSettings) -> list[str]:
    """Why the chart's childPods defaults cannot be used (they, or a component's entry childPods.trainer /
    .engine / .router, loosen the restricted security context), as messages naming the value
    (`childPods.securityContext.runAsNonRoot: ...`); empty when they can."""
    parts = [("childPods", pod)]
    if isinstance(pod, ChildPodSettings):
        parts += [(f"childPods.{c}", sub) for c in POD_COMPONENTS if (sub := getattr(pod, c)) is not None]
    return [f"{v.field}: {v.problem}" for where, p in parts for v in (
        *_security_violations(p.security_context, f"{where}.securityContext"),
        *_security_violations(p.container_security_context, f"{where}.containerSecurityContext"))]


def policy_violations(obj: Resource, own_images: tuple[str, ...], policy: SpecPolicy) -> list[Violation]:
    """Every field of a parsed FineTuneJob or ModelRoute that `policy` refuses (empty: the spec may run), in
    field order. `own_images`: the operator's own images (its image, trainer image and engine image), always
    allowed with any tag. Other kinds ask for nothing the policy covers: always empty."""
    out: list[Violation] = []
    if isinstance(obj, FineTuneJob):
        spec = obj.spec
        if spec.image and not image_allowed(spec.image, own_images, policy):
            out.append(Violation("spec.image", f"image {spec.image!r} is not one of the operator's images",
                                 SETTING_IMAGES))
        if spec.service_account_name and not _glob_match(spec.service_account_name, policy.allowed_service_accounts):
            out.append(Violation("spec.serviceAccountName", f"the trainer would run as ServiceAccount "
                                 f"{spec.service_account_name!r} instead of its own", SETTING_ACCOUNTS))
        out += pod_settings_violations(spec.pod, "spec.pod", policy)
    elif isinstance(obj, ModelRoute):
        spec = obj.spec
        for where, image in (("spec.engine.image", spec.engine.image), ("spec.router.image", spec.router.image)):
            if image and not image_allowed(image, own_images, policy):
                out.append(Violation(where, f"image {image!r} is not one of the operator's images", SETTING_IMAGES))
        out += engine_arg_violations(list(spec.engine.extra_args), policy)
        sref = spec.base_model.credentials_secret_ref
        own = {sref.name} if sref is not None else set()
        out += _env_violations([dict(e) for e in spec.engine.env], own, policy, "spec.engine.env")
        if spec.autoscaling is not None and spec.autoscaling.prometheus_address is not None:
            out += prometheus_address_violations(spec.autoscaling.prometheus_address, policy)
        cache = spec.engine.model_cache
        if cache is not None and cache.host_path and not _glob_match(cache.host_path,
                                                                     policy.allowed_model_cache_host_paths):
            out.append(Violation("spec.engine.modelCache.hostPath", f"hostPath {cache.host_path!r} would mount the "
                                 "node's filesystem into the replicas", SETTING_HOST_PATHS))
        out += pod_settings_violations(spec.engine.pod, "spec.engine.pod", policy)
        out += pod_settings_violations(spec.router.pod, "spec.router.pod", policy)
    return out


def unconditional_violations(obj: Resource) -> list[Violation]:
    """The violations of `obj` no policy allows (Violation.unconditional: a loosened security context, a flag,
    env name or pod label the operator owns, a malformed Prometheus address): what every operator refuses,
    whatever its chart's operator.policy says. `loraplane validate`/`render` without the chart's values check
    these; the operator checks them with its policy (the default one too)."""
    return [v for v in policy_violations(obj, (), SpecPolicy()) if v.unconditional]


def policy_message(violations: list[Violation]) -> str:
    """The condition message of a refused spec: every violation, `; `-joined, then what to do (asking the
    platform team only where a setting could allow one)."""
    todo = ("change the spec" if all(v.unconditional for v in violations)
            else "change the spec, or ask the platform team to allow it")
    return "; ".join(str(v) for v in violations) + f". Nothing was created or changed: {todo}"


def split_list(value: str | None) -> tuple[str, ...] | None:
    """A comma- or whitespace-separated environment value as a tuple (None when the variable is unset)."""
    if value is None:
        return None
    return tuple(t for t in re.split(r"[,\s]+", value) if t)


__all__ = ["chart_pod_settings_problems", "metadata_key_reserved", "pod_settings_violations", "DEFAULT_ENGINE_ARGS", "DEFAULT_ENGINE_ENV", "DENIED_ENV_NAMES", "ENGINE_ENV_NEVER", "ENGINE_OWNED_ARGS",
           "ENGINE_OWNED_ENV", "engine_env_name_violations", "SpecPolicy", "Violation", "engine_arg_violations",
           "flag_name", "image_allowed", "image_repository", "policy_message", "policy_violations",
           "prometheus_address_violations", "split_list", "unconditional_violations"]
