"""Every reason the code can put in front of a user is documented in docs/troubleshooting.md."""

from __future__ import annotations

import re
from pathlib import Path

from loraplane.api import reasons
from loraplane.trainer.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "operator" / "loraplane"
# Where reasons are emitted: conditions (controllers), failures (trainer), replica reports (loader gate and
# reconciler), compatibility verdicts (builders).
EMITTERS = ["controllers", "trainer", "loader", "builders"]
# CamelCase literals in those modules that are not reasons: Kubernetes kinds and fields, container waiting
# reasons and cloud error codes the code *reads* to categorise, class and component names.
NOT_REASONS = {
    "AverageValue", "BuildSettings", "ConfigMap", "DoesNotExist", "EnginePod", "ErrImageNeverPull", "ErrImagePull",
    "ExpiredToken", "FallbackToLogsOnError", "FineTuneJob", "HorizontalPodAutoscaler", "ImagePullBackOff",
    "InvalidAccessKeyId", "InvalidImageName", "KubeBinding", "KubeClient", "ModelRoute", "NoSuchBucket",
    "NoSuchKey", "NotFound", "NotIn", "OperatorSettings", "PodDisruptionBudget", "RoleBinding", "RollingUpdate",
    "ScaledObject", "ServiceAccount", "SignatureDoesNotMatch", "TrainPod", "TrainerError", "WorkQueue",
    "AlreadyLoaded", "CreateContainerConfigError", "CrashLoopBackOff", "ContainerCreating", "PodInitializing",
    "DisruptionTarget", "FailJob", "PodFailurePolicy", "PodScheduled",  # Kubernetes vocabulary, not reasons of ours
}


def camel_literals(path: Path) -> set[str]:
    return set(re.findall(r"[\"']([A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+)[\"']", path.read_text()))


def test_every_emitted_reason_is_documented():
    found: dict[str, str] = {}
    for area in EMITTERS:
        for path in sorted((PKG / area).rglob("*.py")):
            for lit in camel_literals(path):
                found.setdefault(lit, str(path.relative_to(ROOT)))
    assert {"RankTooLarge", "NoEffect", "DatasetNotFound"} <= set(found)  # the scan sees them
    undocumented = {lit: where for lit, where in found.items()
                    if lit not in reasons.BY_NAME and lit not in NOT_REASONS}
    assert not undocumented, f"add these to operator/loraplane/api/reasons.py (or NOT_REASONS): {undocumented}"


def test_single_word_reasons_documented():
    # One-word reasons escape the CamelCase scan above: the loader's report reasons and the condition reasons
    # the controllers set.
    import inspect

    from loraplane.controllers import adapter, finetunejob, modelroute
    from loraplane.loader import reconciler

    src = inspect.getsource(reconciler) + "".join(inspect.getsource(m) for m in (adapter, finetunejob, modelroute))
    used = set(re.findall(r'move\("[A-Za-z]+", "([A-Z][a-z]+)"', src))
    used |= set(re.findall(r'"(?:True|False|Unknown)", "([A-Z][a-z]+)"', src))
    used |= set(re.findall(r'\("(Retrying)", ', src))
    assert used and used <= set(reasons.BY_NAME), used - set(reasons.BY_NAME)


def test_trainer_failure_reasons_documented():
    missing = set(EXIT_CODES) - set(reasons.BY_NAME) - {"Ok", "OK"}
    assert not missing


def test_job_reasons_the_operator_maps_are_documented():
    # Kubernetes' own Job failure reasons are copied into status.failure.reason.
    assert {"DeadlineExceeded", "BackoffLimitExceeded", "OOMKilled", "ImagePull"} <= set(reasons.BY_NAME)


def test_troubleshooting_is_generated():
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    assert text == reasons.render_troubleshooting(), "run `loraplane crds`"
    for r in reasons.REASONS:
        assert f"`{r.name}`" in text and r.fix
