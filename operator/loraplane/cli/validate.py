"""`loraplane validate FILE...`: validate loraplane manifests exactly as the operator parses them (schema and
CEL rules), before they are applied."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from loraplane.api.reasons import Reason
from loraplane.api.redaction import redacted
from loraplane.api.validation import format_validation_error
from loraplane.local.manifests import parse_document, read_documents

if TYPE_CHECKING:
    from loraplane.api.pods import ChildPodSettings
    from loraplane.builders.settings import BuildSettings


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `loraplane validate`: the YAML files to check, and the chart values whose operator policy
    they must also meet."""
    p.add_argument("files", nargs="*", type=Path, help="YAML files (multi-document allowed); - reads stdin")
    # The same spellings on validate, render and run (-f/--filename/--file, --values/--policy).
    p.add_argument("-f", "--filename", "--file", dest="file_options", action="append", type=Path, metavar="FILE",
                   help="a YAML file to validate, as render -f takes it (repeatable; - for stdin)")
    p.add_argument("--values", "--policy", dest="policy", type=Path, metavar="VALUES",
                   help="the loraplane chart's values file the operator is installed with: also check each "
                        "FineTuneJob and ModelRoute against its operator.policy (and its images), as the operator "
                        "does (reason PolicyViolation; docs/security.md); without it, only what no policy allows "
                        "(a securityContext loosening the restricted profile, operator-owned flags, env and labels)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 on warnings too (e.g. a contentRouting name no route among the files publishes: "
                        "a typo, unless another route in the cluster publishes it), for CI")


# The keys of the chart's operator.policy (values.yaml, values.schema.json), each read below.
POLICY_KEYS = ("allowedImages", "allowedEngineArgs", "allowTrustRemoteCode", "allowedEnvSecrets", "allowedEngineEnv",
               "allowedServiceAccounts", "allowedPrometheusAddresses", "allowedPriorityClasses",
               "allowedRuntimeClasses", "allowedPodMetadataKeys", "allowedModelCacheHostPaths")


def settings_from_values(values: dict) -> "BuildSettings":
    """The BuildSettings whose policy and own images the chart `values` (a values.yaml, defaults filled in for
    what it omits) give the operator: `operator.policy.*` and the repositories of image, trainerImage and
    engineImage (any tag of those is allowed, so the tags do not matter here). Raises ValueError for a values
    file that is not a mapping or whose policy entries have the wrong types."""
    from loraplane.builders.policy import SpecPolicy
    from loraplane.builders.settings import BuildSettings

    if not isinstance(values, dict):
        raise ValueError("the values file is not a YAML mapping")
    d, dp = BuildSettings(), SpecPolicy()
    operator = values.get("operator") or {}
    if not isinstance(operator, dict):
        raise ValueError("operator must be a mapping")
    policy = operator.get("policy") or {}
    if not isinstance(policy, dict):
        raise ValueError("operator.policy must be a mapping")
    # A misspelt key would be ignored here and the default policy checked instead of the intended one; the chart's
    # values.schema.json refuses it at install (additionalProperties: false), so it is an error here too.
    for key in policy:
        if key not in POLICY_KEYS:
            close = difflib.get_close_matches(str(key), POLICY_KEYS, n=1)
            raise ValueError(f"operator.policy.{key}: unknown key" + (f": did you mean {close[0]!r}?" if close else
                             f"; the keys are {', '.join(POLICY_KEYS)}"))

    def strings(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = policy.get(key, default)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"operator.policy.{key} must be a list of strings")
        return tuple(value)

    trust = policy.get("allowTrustRemoteCode", False)
    if not isinstance(trust, bool):
        raise ValueError("operator.policy.allowTrustRemoteCode must be true or false")

    def repo(key: str, default: str) -> str:
        image = values.get(key)
        found = image.get("repository") if isinstance(image, dict) else None
        return found if isinstance(found, str) and found else default

    return BuildSettings(
        child_pods=child_pods_from_values(values),
        image=repo("image", d.image), trainer_image=repo("trainerImage", d.trainer),
        engine_image=repo("engineImage", d.engine_image),
        policy=SpecPolicy(allowed_images=strings("allowedImages", dp.allowed_images),
                          allowed_engine_args=strings("allowedEngineArgs", dp.allowed_engine_args),
                          allow_trust_remote_code=trust,
                          allowed_env_secrets=strings("allowedEnvSecrets", dp.allowed_env_secrets),
                          allowed_engine_env=strings("allowedEngineEnv", dp.allowed_engine_env),
                          allowed_service_accounts=strings("allowedServiceAccounts", dp.allowed_service_accounts),
                          allowed_prometheus_addresses=strings("allowedPrometheusAddresses",
                                                               dp.allowed_prometheus_addresses),
                          allowed_priority_classes=strings("allowedPriorityClasses", dp.allowed_priority_classes),
                          allowed_runtime_classes=strings("allowedRuntimeClasses", dp.allowed_runtime_classes),
                          allowed_pod_metadata_keys=strings("allowedPodMetadataKeys", dp.allowed_pod_metadata_keys),
                          allowed_model_cache_host_paths=strings("allowedModelCacheHostPaths",
                                                                 dp.allowed_model_cache_host_paths)))


def child_pods_from_values(values: dict) -> "ChildPodSettings":
    """The chart `values`' childPods as the operator reads them (the chart's loraplane.childPods helper): empty
    entries dropped, and the top-level imagePullSecrets when childPods.imagePullSecrets is null. Raises
    ValueError naming the value when it is not PodSettings or loosens the restricted security context."""
    from pydantic import ValidationError as _ValidationError

    from loraplane.api.pods import POD_COMPONENTS, ChildPodSettings
    from loraplane.builders.policy import chart_pod_settings_problems

    raw = values.get("childPods") or {}
    if not isinstance(raw, dict):
        raise ValueError("childPods must be a mapping")
    pods = {k: v for k, v in raw.items() if v and k != "imagePullSecrets"}
    for component in POD_COMPONENTS:   # childPods.trainer/engine/router: their empty entries dropped too
        if isinstance(sub := pods.get(component), dict):
            if not (sub := {k: v for k, v in sub.items() if v}):
                pods.pop(component)
            else:
                pods[component] = sub
    secrets = raw.get("imagePullSecrets") if isinstance(raw.get("imagePullSecrets"), list) else \
        values.get("imagePullSecrets")
    if secrets:
        pods["imagePullSecrets"] = secrets
    try:
        settings = ChildPodSettings.model_validate(pods)
    except _ValidationError as exc:
        raise ValueError(format_validation_error(exc, "childPods.").replace("\n", "; ")) from exc
    if problems := chart_pod_settings_problems(settings):
        raise ValueError("; ".join(problems))
    return settings


def http_uris(value: object, path: str) -> list[tuple[str, str]]:
    """(field path, value) of every string under `value` that is an http:// or https:// URI (wire names,
    Kubernetes' list notation)."""
    if isinstance(value, str):
        return [(path, value)] if value.lower().startswith(("http://", "https://")) else []
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in http_uris(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [hit for i, v in enumerate(value) for hit in http_uris(v, f"{path}[{i}]")]
    return []


def fetch_warning(uri: str) -> str | None:
    """What the fetchers will do with the http(s) `uri`, when they refuse it: the fetchers' own check
    (storage.fetchers.http.url_refusal), with and without the chart's allowInsecureHttp. None when it is
    fetched (a host name is checked when resolved, at run time)."""
    from loraplane.storage.fetchers.http import url_refusal

    try:
        strict, insecure = url_refusal(uri, False), url_refusal(uri, True)
    except ValueError:   # not a URL yarl reads: the schema check reports it
        return None
    if insecure is not None:
        return f"refused at run time ({Reason.InsecureSource}) even with operator.allowInsecureHttp: {insecure[0]}"
    if strict is not None:
        return (f"refused at run time ({Reason.InsecureSource}) unless the operator allows it (chart value "
                f"operator.allowInsecureHttp): {strict[0]}" + ("; use https" if uri.lower().startswith("http:") else ""))
    return None


def _adapter_named_by_job(doc: dict) -> tuple[str, str] | None:
    """(namespace, spec.output.adapterName) of a FineTuneJob document that did not validate, when it names one."""
    if doc.get("kind") != "FineTuneJob":
        return None
    spec, meta = doc.get("spec"), doc.get("metadata")
    output = spec.get("output") if isinstance(spec, dict) else None
    name = output.get("adapterName") if isinstance(output, dict) else None
    namespace = (meta.get("namespace") if isinstance(meta, dict) else None) or "default"
    return (str(namespace), name) if isinstance(name, str) else None


def validate_main(args: argparse.Namespace) -> int:
    """Validate every loraplane object in the files as the operator parses them (and, with --policy, against the
    operator's policy), printing ok/error per document (other API groups are skipped; an unknown loraplane.io
    kind, unreadable YAML or a non-object document is an error) and warnings for what the operator would report
    about the routes; returns 1 when any is invalid or refused, or when there is no loraplane object at all
    (or, with --strict, when anything was warned about), 2 when no file is named, else 0."""
    from loraplane.api import GROUP

    from loraplane.builders import route_warnings
    from loraplane.builders.policy import unconditional_violations

    args.files = [*(getattr(args, "files", None) or []), *(getattr(args, "file_options", None) or [])]
    if not args.files:
        print("error no file: name the YAML files to validate (loraplane validate FILE... or -f FILE)")
        return 2
    settings = None
    if (policy := getattr(args, "policy", None)) is not None:
        try:
            settings = settings_from_values(yaml.safe_load(policy.read_text()))
        except (OSError, yaml.YAMLError, ValueError) as exc:
            print(f"error {policy}: {exc}")
            return 1
    bad = 0
    parsed = []
    invalid_jobs_produce: set[tuple[str, str]] = set()
    for d in read_documents(args.files):
        if d.skip:
            continue
        if d.error is not None:
            bad += 1
            print(f"error {d.where}\n  {d.error}")
            continue
        obj, detail = parse_document(d.doc)
        if obj is None:
            bad += 1
            print(f"error {d.where}\n{detail}")
            if produces := _adapter_named_by_job(d.doc):
                invalid_jobs_produce.add(produces)
            continue
        parsed.append(obj)
        # Without the chart's values: what no policy allows (a loosened security context, ...), the default
        # operator's refusals; with them, everything that operator's policy refuses.
        violations = settings.violations(obj) if settings is not None else unconditional_violations(obj)
        if violations:
            bad += 1
            detail = "\n".join(f"  {v}" for v in violations)
            print(f"error {d.where} ({Reason.PolicyViolation})\n{detail}")
        else:
            print(f"ok    {d.where}")
    if not bad and not parsed:
        print(f"error no {GROUP} object (FineTuneJob, Adapter, ModelRoute) in {', '.join(map(str, args.files))}")
        return 1
    # What the operator would report about the valid routes, resolved against the files' Adapters: a public name
    # published twice (served once, PublicNameConflict), a backend left out (missing here, or incompatible).
    warned = 0
    for line in route_warnings(parsed, frozenset(invalid_jobs_produce)):
        warned += 1
        print(f"warn  {line}")
    for obj in parsed:
        for path, uri in http_uris(obj.wire().get("spec") or {}, "spec"):
            if warning := fetch_warning(uri):
                warned += 1
                print(f"warn  {obj.kind}/{obj.metadata.name}: {path} ({redacted(uri)}): {warning}")
    if warned and getattr(args, "strict", False):
        print(f"error {warned} warning(s) with --strict")
        return 1
    return 1 if bad else 0
