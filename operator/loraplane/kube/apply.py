"""Server-side apply of an owner's children, writing only the ones whose rendering changed.

Every child the builders render carries `loraplane.io/spec-hash` (HASH_ANNOTATION), the hash of its desired
manifest. The Applier remembers the hash it last saw per object and compares: an unchanged child costs
nothing, an unknown one one GET (a restarted operator reads each child once and writes none that are
unchanged). Writes go through KubeClient.apply (field manager `loraplane`, force).
"""

from __future__ import annotations

import asyncio
import logging

from loraplane.api.keys import HASH_ANNOTATION
from loraplane.kube.client import ApiError, KubeClient

log = logging.getLogger("loraplane.operator")


def controller_of(obj: dict | None) -> dict | None:
    """The controller ownerReference of `obj` (the one with `controller: true`), else None."""
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return next((r for r in refs if isinstance(r, dict) and r.get("controller")), None)


def owned_by(obj: dict | None, uid: str | None) -> bool:
    """Whether `obj`'s controller ownerReference names the owner `uid`: the only proof that a child found by
    its (computed) name is this owner's, since two owners' child names can coincide (a shortened long name
    `<head>-<hash8>` is also a valid name another object may have)."""
    ref = controller_of(obj)
    return bool(uid) and ref is not None and ref.get("uid") == uid


def owner_words(obj: dict | None) -> str:
    """`<Kind> <name>` of `obj`'s controller owner, or `no loraplane owner` (for a NameTaken message)."""
    ref = controller_of(obj)
    return f"{ref.get('kind', '?')} {ref.get('name', '?')}" if ref else "no owner (created by hand?)"


class NameTaken(Exception):
    """A child's name is held by an object another owner controls (or none does): the Applier never writes it
    (server-side apply with force would take it over). `child` is `<Kind> <name>`, `holder` who has it."""

    def __init__(self, child: str, holder: str):
        super().__init__(f"{child} already exists and belongs to {holder}")
        self.child, self.holder = child, holder


# Kinds that refer to a Role the same stage may create: applied after the rest of their stage (Applier.ensure).
BINDING_KINDS = frozenset({"RoleBinding", "ClusterRoleBinding"})


class Applier:
    """Server-side apply of children, skipped when the live object already carries the same spec hash.

    The hash of what was last applied is remembered per object; an object never seen is read once (a GET,
    not a write) to learn its hash, so a restarted operator writes nothing for unchanged children.
    """

    def __init__(self, kube: KubeClient):
        self.kube = kube
        self._known: dict[tuple[str, str, str, str], str] = {}
        # Bumped by reset(): callers that skip rendering while nothing changed compare it, so after a reset
        # they render and verify again.
        self.epoch = 0

    def reset(self) -> None:
        """Forget every remembered hash: the next ensure() of each child reads it from the server again
        (the periodic resync does this, so a child changed or deleted behind the operator's back returns)."""
        self._known.clear()
        self.epoch += 1

    @staticmethod
    def _id(m: dict) -> tuple[str, str, str, str]:
        return m["apiVersion"], m["kind"], m["metadata"].get("namespace", ""), m["metadata"]["name"]

    async def ensure(self, stages: list[list[dict]], fresh: bool = False) -> int:
        """Apply what differs; returns the number of objects written. Objects of one stage are applied
        concurrently, stages in order (RBAC and config before the workloads that use them). `fresh`: the
        owner was never reconciled, so its children cannot exist yet and are applied without a read."""
        written = 0
        for stage in stages:
            # Bindings after the Roles of their stage: with RBAC enforced, the API server checks that the writer
            # holds what a RoleBinding grants (escalation check) by reading its Role, and refuses the binding
            # with HTTP 404 while the Role does not exist yet (the operator holds no `bind` verb).
            for part in ([m for m in stage if m["kind"] not in BINDING_KINDS],
                         [m for m in stage if m["kind"] in BINDING_KINDS]):
                if part:
                    written += sum(await asyncio.gather(*(self._ensure_one(m, fresh) for m in part)))
        return written

    async def _check_owner(self, m: dict, live: dict | None) -> None:
        """Raise NameTaken when `live` (the object named as child `m`) is not controlled by `m`'s owner."""
        owner = controller_of(m)
        if live is not None and owner is not None and not owned_by(live, owner.get("uid")):
            raise NameTaken(f"{m['kind']} {m['metadata']['name']}", owner_words(live))

    async def _ensure_one(self, m: dict, fresh: bool) -> int:
        ident = self._id(m)
        want = m["metadata"].get("annotations", {}).get(HASH_ANNOTATION)
        have = self._known.get(ident)
        if have is None and not fresh:
            live = await self.kube.get(ident[0], ident[1], ident[2], ident[3])
            await self._check_owner(m, live)
            have = ((live or {}).get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
        if have == want and want is not None:
            self._known[ident] = want
            return 0
        try:
            await self.kube.apply(m, result=False)
        except ApiError as exc:
            if exc.status in (409, 422):
                # A fresh owner applies without reading first; an object of another owner with this name makes
                # the apply fail (two controller ownerReferences are invalid): say whose it is.
                await self._check_owner(m, await self.kube.get(ident[0], ident[1], ident[2], ident[3]))
            if exc.status != 422 or m["kind"] != "Job":
                raise
            # A Job's pod template is immutable: when the rendering of a running Job changed (a new operator
            # version or default image), only the fields a Job may change are updated; the run goes on.
            spec = {k: m["spec"].get(k) for k in ("backoffLimit", "activeDeadlineSeconds", "parallelism")}
            await self.kube.merge_patch(ident[0], ident[1], ident[2], ident[3],
                                        {"metadata": {"annotations": {HASH_ANNOTATION: want}}, "spec": spec},
                                        result=False)
            log.info("Job %s/%s: pod template unchanged (immutable); updated %s only", ident[2], ident[3],
                     ", ".join(k for k, v in spec.items() if v is not None))
        self._known[ident] = want
        return 1

    async def prune(self, unwanted: list[tuple[str, str, str, str]], owner_uid: str) -> int:
        """Delete children the spec no longer asks for (e.g. the HPA after a switch to KEDA), only when
        this owner owns them. Returns the number deleted."""
        deleted = 0
        for api_version, kind, namespace, name in unwanted:
            ident = (api_version, kind, namespace, name)
            if self._known.get(ident) == "absent":
                continue
            live = await self.kube.get(api_version, kind, namespace, name)
            refs = ((live or {}).get("metadata") or {}).get("ownerReferences") or []
            if live is not None and any(r.get("uid") == owner_uid for r in refs):
                await self.kube.delete(api_version, kind, namespace, name)
                deleted += 1
            self._known[ident] = "absent"
        return deleted

    def forget(self, namespace: str, name_prefix: str = "") -> None:
        """Forget the hashes of the children in `namespace` whose name starts with `name_prefix` (their owner
        was deleted)."""
        for ident in [i for i in self._known if i[2] == namespace and i[3].startswith(name_prefix)]:
            del self._known[ident]


__all__ = ["Applier", "NameTaken", "controller_of", "owned_by", "owner_words"]
