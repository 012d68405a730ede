"""``novasandbox serve --ray ADDRESS``: the HTTP API as a Ray driver over the cluster's
nodes (``registry.py``, ``app.py``). Binding, TLS, keys and logs are the single-host
server's (``server/serve.py``). A stop leaves the nodes' sandboxes running: they belong
to the cluster, and the next start routes them again."""

from __future__ import annotations

import logging
from pathlib import Path

from ..server.app import Settings
from ..server.keys import KeyStore
from ..server.serve import (
    CleanStop,
    bind,
    check_bind,
    configure_logging,
    listening_url,
    uvicorn_config,
)
from ..server.signed import UrlSigner, load_secret
from .app import create_cluster_app
from .node import NAMESPACE, NodeConfig
from .registry import ClusterRegistry

log = logging.getLogger("novasandbox.cluster")


def connect_ray(address: str, node_ip: str | None = None) -> None:
    """Join the Ray cluster at ``address`` ("auto": the one this host runs) as a driver."""
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address=address,
        namespace=NAMESPACE,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address=node_ip,
    )


def serve_cluster(
    *,
    ray_address: str,
    state: Path,
    host: str,
    port: int,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    insecure: bool = False,
    log_level: str = "info",
    settings: Settings | None = None,
    node_config: NodeConfig | None = None,
    ray_node_ip: str | None = None,
    k: int = 2,
    node_timeout: float = 1.5,
    vcpu_overcommit: float = 4.0,
    memory_overcommit: float = 1.0,
) -> None:
    check_bind(host, tls_cert, tls_key, insecure)
    keys = KeyStore(state)
    known = keys.current()
    sock = bind(host, port)
    configure_logging(log_level)
    try:
        connect_ray(ray_address, ray_node_ip)
        registry = ClusterRegistry(
            node_config,
            k=k,
            node_timeout=node_timeout,
            vcpu_overcommit=vcpu_overcommit,
            memory_overcommit=memory_overcommit,
        )
        signer = UrlSigner(load_secret(state))  # the single host's: URLs survive a restart
        app = create_cluster_app(keys, registry, settings, signer=signer)
        config = uvicorn_config(app, tls_cert, tls_key)
        log.info(
            "listening",
            extra={
                "fields": {
                    "url": listening_url(sock, tls_cert is not None),
                    "keys": len(known),
                    "state_dir": str(state),
                    "ray": ray_address,
                }
            },
        )
        CleanStop(config).run(sockets=[sock])
    finally:
        sock.close()
    log.info("stopped", extra={"fields": {}})


__all__ = ["connect_ray", "serve_cluster"]
