"""A real multi-node Ray cluster on one machine, for the cluster tests: the head in this
network namespace on a bridge the test makes, and every node in a network namespace of
its own joined to the bridge by a veth pair (``ray start --node-ip-address`` there; Ray
would otherwise bind the machine's main interface). Each node has its own Ray temp
folder, a small object store and a ``novasandbox`` resource. All traffic stays on the
bridge and in the namespaces; nothing is reachable from outside (no route, no NAT).

``close`` kills every process of the namespaces and of the head (found by the cluster's
own temp folder in their command lines), deletes the namespaces, the veths and the
bridge, and removes the folder. Needs root (network namespaces), ``ip``, ``nsenter`` and
``ray``.

Commands run in a namespace through ``nsenter --net=/run/netns/NS``, never ``ip -n NS`` or
``ip netns exec NS``: those two also make a mount namespace and remount ``/`` and ``/sys``
in it, which fails in a chroot (``"mount --make-rslave /" failed``); ``ip netns add``,
``ip netns pids`` and ``ip netns del`` do not, and work there. Ray does not need the
namespace's own ``/sys``: it is told its address, and reads interfaces through sockets and
``/proc/self/net``, which follow the network namespace.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.server_support import Server, make_key

RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE = 78 * 1024 * 1024
"""Bytes of object store per node (Ray's default takes 30% of the machine's memory)."""


@functools.cache
def can_run() -> str | None:
    """Why a cluster cannot be made here (None: it can): root, ``ip``, ``nsenter``,
    ``ray``, and a network namespace with a veth pair that really works (a container may
    not have them)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no ip (iproute2)"
    if shutil.which("nsenter") is None:
        return "no nsenter (util-linux)"
    if not Path(RAY).exists():
        return "ray is not installed (the ray extra)"
    tag = secrets.token_hex(3)
    netns, veth = f"nsp{tag}", f"vp{tag}"
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip_in(netns, "addr", "add", "10.254.254.2/24", "dev", "eth0")
    except AssertionError as exc:
        return f"network namespaces do not work here: {exc}"
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def _in_netns(netns: str) -> list[str]:
    """The prefix that runs a command in network namespace ``netns`` (made by ``ip netns
    add``), and nothing else of it changed (unlike ``ip netns exec``: see the top)."""
    return ["nsenter", f"--net=/run/netns/{netns}"]


def _ip_in(netns: str, *args: str) -> None:
    """``ip ARGS`` in network namespace ``netns``."""
    done = subprocess.run([*_in_netns(netns), "ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        err = done.stderr.strip() or done.returncode
        raise AssertionError(f"ip {' '.join(args)} (in {netns}): {err}")


@dataclass
class RayNode:
    index: int
    netns: str
    veth: str
    address: str
    temp: Path
    env: dict[str, str] = field(default_factory=dict)
    killed: bool = False

    def pids(self) -> list[int]:
        out = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]


class RayCluster:
    """A head and ``nodes`` Ray nodes, each with ``slots`` of the ``novasandbox``
    resource (``node_slots``: each node's own, by index; ``node_env``: extra environment of
    each node's Ray processes, by index)."""

    def __init__(
        self,
        nodes: int,
        slots: int = 8,
        node_env: dict[int, dict[str, str]] | None = None,
        node_slots: list[int] | None = None,
    ) -> None:
        self.tag = secrets.token_hex(3)
        self.root = Path(f"/tmp/nsray-{self.tag}")
        self.root.mkdir()
        self.bridge = f"nsb{self.tag}"
        self.subnet = f"10.{random.randint(160, 250)}.{random.randint(0, 255)}"
        self.head_address = f"{self.subnet}.1"
        self.port = random.randint(20000, 29999)
        self.slots = slots
        self.node_slots = node_slots or []
        self.nodes: list[RayNode] = []
        self.node_env = node_env or {}
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.head_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            self._ray(
                [],
                "start",
                "--head",
                "--node-ip-address",
                self.head_address,
                "--port",
                str(self.port),
                "--num-cpus",
                "0",
                "--object-store-memory",
                str(OBJECT_STORE),
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
                "--temp-dir",
                str(self.root / "h"),
                env=self.env,
            )
            for _ in range(nodes):
                self.add_node()
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        return f"{self.head_address}:{self.port}"

    def _ray(self, prefix: list[str], *args: str, env: dict[str, str]) -> None:
        done = subprocess.run(
            [*prefix, RAY, *args], capture_output=True, text=True, env=env, timeout=180
        )
        if done.returncode != 0:
            raise AssertionError(f"ray {args[0]} failed:\n{done.stdout}\n{done.stderr}")

    def add_node(self, slots: int | None = None) -> RayNode:
        i = len(self.nodes)
        node = RayNode(
            i,
            netns=f"ns{self.tag}{i}",
            veth=f"v{self.tag}{i}",
            address=f"{self.subnet}.{10 + i}",
            temp=self.root / f"n{i}",
            env={**self.env, **self.node_env.get(i, {})},
        )
        self.nodes.append(node)
        _ip("netns", "add", node.netns)
        _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        _ip("link", "set", node.veth, "master", self.bridge, "up")
        _ip_in(node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        _ip_in(node.netns, "link", "set", "eth0", "up")
        _ip_in(node.netns, "link", "set", "lo", "up")
        self._ray(
            _in_netns(node.netns),
            "start",
            "--address",
            self.address,
            "--node-ip-address",
            node.address,
            "--num-cpus",
            "1",
            "--object-store-memory",
            str(OBJECT_STORE),
            "--resources",
            json.dumps({"novasandbox": self._slots(i) if slots is None else slots}),
            "--disable-usage-stats",
            "--temp-dir",
            str(node.temp),
            env=node.env,
        )
        return node

    def _slots(self, i: int) -> int:
        return self.node_slots[i] if i < len(self.node_slots) else self.slots

    def kill_node(self, i: int) -> float:
        """SIGKILL every process of node ``i`` (its raylet, its workers and the node
        agent, and what they started there); the time it was done (monotonic)."""
        node = self.nodes[i]
        pids = node.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.killed = True
        return time.monotonic()

    def _head_pids(self) -> list[int]:
        mark = str(self.root).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if mark in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def close(self) -> None:
        for node in self.nodes:
            for pid in node.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for _ in range(3):
            pids = self._head_pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for node in self.nodes:
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", node.veth], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        keep = os.environ.get("NOVASANDBOX_KEEP_CLUSTER_LOGS")
        if keep:  # for a failure to be read: the server's logs, the nodes' Ray logs
            dest = Path(keep) / self.root.name
            shutil.copytree(
                self.root,
                dest,
                ignore=shutil.ignore_patterns("*.sock", "sockets", "*.qcow2", "*.ext4", "plasma*"),
                ignore_dangling_symlinks=True,
                dirs_exist_ok=True,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def serve(self, *extra: str, env: dict[str, str] | None = None) -> tuple[Server, str]:
        """``serve --ray`` over this cluster (``extra``: more options; its state and log
        in the cluster's folder, the nodes' state in ``nodes`` there) and a key of it."""
        state = self.root / "server"
        state.mkdir()
        key = make_key(state, "tests")
        server = Server(
            state,
            "--ray",
            self.address,
            "--ray-node-ip",
            self.head_address,
            "--node-state-dir",
            str(self.root / "nodes"),
            *extra,
            env=env,
            log=self.root / "server.log",
        )
        return server, key

    def leftovers(self) -> list[str]:
        """What of the cluster is still there (processes, namespaces, links)."""
        left = [f"process {p}" for p in self._head_pids()]
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left += [f"netns {n.netns}" for n in self.nodes if n.netns in names]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        left += [
            f"link {x}" for x in [self.bridge, *(n.veth for n in self.nodes)] if f" {x}" in links
        ]
        return left
