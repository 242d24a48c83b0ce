"""Operator-wide settings the builders need (images, artifact store, API versions of the target cluster)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplane import __version__ as _version
from loraplane.api.common import Resource
from loraplane.api.modelroute import DEFAULT_ENGINE_IMAGE
from loraplane.api.pods import ChildPodSettings, PodSettings
from loraplane.builders.policy import SpecPolicy, Violation, policy_violations

DEFAULT_IMAGE = f"ghcr.io/loraplane/loraplane:{_version}"


@dataclass(frozen=True)
class ArtifactClaim:
    """The PersistentVolumeClaim behind a pvc:// artifact store, which the operator creates in a FineTuneJob's
    namespace when it is missing (chart operator.artifacts; builders.finetunejob.artifact_claim). `size` is a
    Kubernetes quantity; `storage_class` None: the cluster's default StorageClass."""

    create: bool = True
    storage_class: str | None = None
    access_mode: str = "ReadWriteOnce"
    size: str = "50Gi"


@dataclass(frozen=True)
class BuildSettings:
    """Operator-wide settings the builders need: images, the artifact store and the API versions and
    features the target cluster serves."""

    # The image with the loraplane package: trainer, adapter loader and router (one image, three entry points).
    image: str = DEFAULT_IMAGE
    trainer_image: str | None = None          # default: `image` (with torch/peft for GPU training)
    # vLLM of ModelRoutes that set no spec.engine.image (a mirror in air-gapped clusters).
    engine_image: str = DEFAULT_ENGINE_IMAGE
    # Where a FineTuneJob without spec.output.uri writes its adapter: <artifact_store>/<namespace>/<job>.
    artifact_store: str = "pvc://loraplane-artifacts"
    # How the operator creates the artifact store's claim where it is missing (pvc:// stores only).
    artifact_claim: ArtifactClaim = ArtifactClaim()
    # autoscaling/v2 is GA from Kubernetes 1.23; older clusters (and the 1.20 test server) serve v2beta2.
    hpa_api_version: str = "autoscaling/v2"
    # policy/v1 PodDisruptionBudget from 1.21; 1.20 serves policy/v1beta1.
    pdb_api_version: str = "policy/v1"
    # batch/v1 Job podFailurePolicy (on by default from 1.26): preemptions don't use up backoffLimit and input
    # errors fail at once. Servers before 1.26 refuse the field in a server-side apply: set False there.
    pod_failure_policy: bool = True
    # The loader and fetch-model also fetch plain http:// artifacts and from loopback addresses (the chart's
    # operator.allowInsecureHttp; the local quickstart). Off: https only, no loopback (docs/security.md).
    allow_insecure_http: bool = False
    # A NetworkPolicy per ModelRoute: vLLM's port only from the route's routers (the chart's networkPolicies;
    # docs/security.md, "Engine pods and network"). Off: no policy, and the operator deletes the ones it made.
    network_policies: bool = True
    # What FineTuneJob and ModelRoute specs may ask for: images, vLLM flags, Secrets in env, ServiceAccounts
    # (the chart's operator.policy; builders/policy.py, docs/security.md).
    policy: SpecPolicy = SpecPolicy()
    # Operator-wide settings of every pod the operator creates (the chart's childPods -> LORAPLANE_CHILD_PODS):
    # pull secrets, security context, priority/runtime class, labels, annotations, node selection. A kind's own
    # field (FineTuneJob spec.pod, ModelRoute spec.engine.pod / spec.router.pod) overrides them
    # (builders.common.apply_pod_settings).
    # childPods.trainer / .engine / .router apply to that component's pods only (api.pods.ChildPodSettings).
    child_pods: PodSettings = field(default_factory=ChildPodSettings)

    @property
    def own_images(self) -> tuple[str, ...]:
        """The operator's own images (loraplane, trainer, vLLM): a spec may pick any tag or digest of these."""
        return (self.image, self.trainer, self.engine_image)

    def violations(self, obj: Resource) -> list[Violation]:
        """The fields of a parsed FineTuneJob or ModelRoute this operator's policy refuses (empty: allowed)."""
        return policy_violations(obj, self.own_images, self.policy)

    @property
    def trainer(self) -> str:
        """The trainer image: trainer_image, else the loraplane image."""
        return self.trainer_image or self.image
