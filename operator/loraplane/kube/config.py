"""Where the Kubernetes API server is and how to authenticate to it: one loader for every component.

The operator, its kopf watches (through the login handler in controllers/handlers.py), the loader, the router
and the trainer all read their credentials here, with kubernetes_asyncio's config loaders (the same code
paths as client-go's: kubeconfig clusters/users/contexts including exec plugins and OIDC, and the in-cluster
service account). Sources, first match wins:

1. an explicit kubeconfig (`--kubeconfig`), with an optional context;
2. the in-cluster service account (`KUBERNETES_SERVICE_HOST` + the projected token and CA under
   /var/run/secrets/kubernetes.io/serviceaccount);
3. `$KUBECONFIG` (colon-separated list) or `~/.kube/config`.

Token refresh: a projected service-account token is re-read from its file at most a minute after kubelet
rotates it (kubernetes_asyncio's refresh hook, run before each request); on an HTTP 401 the client calls
`reload()`, which re-reads every source (a kubeconfig's tokenFile, a new exec-plugin token).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config import ConfigException, load_incluster_config
from kubernetes_asyncio.config.kube_config import ENV_KUBECONFIG_PATH_SEPARATOR, KubeConfigLoader, KubeConfigMerger

__all__ = ["ConfigException", "KubeConfig"]


class KubeConfig:
    """The loaded connection settings (a kubernetes_asyncio `Configuration`) and how to refresh them.

    Build it with `from_environment()` (synchronous: it fails fast when no source exists or a kubeconfig does
    not parse); the credentials of a kubeconfig are resolved on the first `configuration()` call, because
    exec plugins and OIDC refreshes are asynchronous.
    """

    def __init__(self, loader: KubeConfigLoader | None = None, configuration: Configuration | None = None,
                 source: str = ""):
        self._loader = loader                 # a kubeconfig; None for the in-cluster service account
        self._configuration = configuration or Configuration()
        self._loaded = loader is None         # in-cluster settings are loaded at construction
        self._lock: asyncio.Lock | None = None
        self.source = source                  # where the settings came from, for messages

    @classmethod
    def from_environment(cls, kubeconfig: str | os.PathLike | None = None,
                         context: str | None = None) -> "KubeConfig":
        """Credentials from an explicit kubeconfig, else the in-cluster service account, else `$KUBECONFIG`
        or `~/.kube/config` (see the module docstring). Raises ConfigException when none is usable."""
        if kubeconfig is None:
            configuration = Configuration()
            try:
                load_incluster_config(client_configuration=configuration)
                return cls(configuration=configuration, source="in-cluster service account")
            except ConfigException:
                pass
        paths = str(kubeconfig) if kubeconfig is not None else os.environ.get("KUBECONFIG") or "~/.kube/config"
        found = [p for p in paths.split(ENV_KUBECONFIG_PATH_SEPARATOR) if p and Path(p).expanduser().exists()]
        if not found:
            where = "no in-cluster service account and " if kubeconfig is None else ""
            raise ConfigException(f"{where}no kubeconfig at {paths}")
        merged = KubeConfigMerger(ENV_KUBECONFIG_PATH_SEPARATOR.join(found))
        loader = KubeConfigLoader(config_dict=merged.config, active_context=context, config_base_path=None)
        return cls(loader=loader, source=f"kubeconfig {paths}" + (f" context {context}" if context else ""))

    async def configuration(self) -> Configuration:
        """The settings, with a kubeconfig's credentials resolved on the first call."""
        if not self._loaded:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if not self._loaded:
                    await self._loader.load_and_set(self._configuration)
                    self._loaded = True
        return self._configuration

    async def authorization(self) -> str | None:
        """The `Authorization` header value ("Bearer ...", "Basic ..."), or None for client certificates
        alone. Runs the refresh hook of an in-cluster token (cheap: a clock check, a file read a minute)."""
        configuration = await self.configuration()
        return await configuration.get_api_key_with_prefix("BearerToken")

    async def reload(self) -> None:
        """Read the credentials again from their source (after an HTTP 401: a rotated or expired token)."""
        if self._loader is None:
            load_incluster_config(client_configuration=self._configuration)
        else:
            await self._loader.load_and_set(self._configuration)
            self._loaded = True
