"""The egress policy of "nat" sandboxes, enforced by the host kernel (nftables).

With user-mode networking every connection a guest makes is a socket of its VMM, and a
confined VMM runs as a uid of its own (``base.confinement``). One nftables table holds
the policy of all sandboxes:

    table inet novasandbox {
        map sandboxes { type uid : verdict }         # VMM uid -> jump sb-<id>
        chain output {                               # hook output
            meta skuid <VMM uid range> meta skuid vmap @sandboxes
            meta skuid <VMM uid range> reject        # a VMM with no policy: nothing
        }
        chain sb-<id> {                              # one per sandbox
            ct state established,related accept      # replies (exposed ports)
            <resolver> port 53 accept                # DNS through the guest's 10.0.2.3
            <allowed destinations> accept
            [with no allow list: the non-public ranges reject, then accept]
            reject
        }
    }

A sandbox's chain and map element are added before its VMM starts and deleted after it
exits (and by ``gc``), each in one atomic ``nft -f`` transaction. Root is needed to change
the ruleset, which is also when VMMs have uids of their own.

``sandbox_script``/``remove_script`` are pure (they return nft's input) and unit-tested;
``apply`` runs ``nft``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address
from pathlib import Path

from ..errors import HostToolMissing, NetworkError
from ..network import NON_PUBLIC, EgressRule
from .base import VMM_ID_BASE, VMM_ID_COUNT

TABLE = "inet novasandbox"
NFT = "nft"


def chain_name(sandbox_id: str) -> str:
    return "sb-" + sandbox_id.removeprefix("sb-")


def base_script() -> str:
    """The table, the map and the output chain (applied once, when the table is absent)."""
    uids = f"{VMM_ID_BASE}-{VMM_ID_BASE + VMM_ID_COUNT - 1}"
    return "\n".join(
        [
            f"add table {TABLE}",
            f"add map {TABLE} sandboxes {{ type uid : verdict ; }}",
            f"add chain {TABLE} output {{ type filter hook output priority 0 ; policy accept ; }}",
            f"add rule {TABLE} output meta skuid {uids} meta skuid vmap @sandboxes",
            f"add rule {TABLE} output meta skuid {uids} meta l4proto tcp reject with tcp reset",
            f"add rule {TABLE} output meta skuid {uids} reject",
            "",
        ]
    )


def _match(rule: EgressRule) -> str:
    where = f"ip daddr {rule.network}"
    if rule.port is not None:
        where += f" meta l4proto {{ tcp, udp }} th dport {rule.port}"
    return where


def sandbox_script(
    sandbox_id: str,
    uid: int,
    rules: Sequence[EgressRule] | None,
    resolvers: Iterable[IPv4Address],
) -> str:
    """nft input that installs the policy of one sandbox. ``rules=None`` means the public
    internet (every non-public range denied); a sequence means those destinations only.
    Pure."""
    chain = chain_name(sandbox_id)
    lines = [
        f"add chain {TABLE} {chain}",
        f"add rule {TABLE} {chain} ct state established,related accept",
    ]
    for resolver in sorted(set(resolvers)):
        lines.append(f"add rule {TABLE} {chain} ip daddr {resolver} udp dport 53 accept")
        lines.append(f"add rule {TABLE} {chain} ip daddr {resolver} tcp dport 53 accept")
    for rule in rules or ():
        lines.append(f"add rule {TABLE} {chain} {_match(rule)} accept")
    if rules is None:
        private = ", ".join(str(n) for n in NON_PUBLIC)
        lines.append(
            f"add rule {TABLE} {chain} ip daddr {{ {private} }} meta l4proto tcp "
            "reject with tcp reset"
        )
        lines.append(f"add rule {TABLE} {chain} ip daddr {{ {private} }} reject")
        lines.append(f"add rule {TABLE} {chain} meta nfproto ipv4 accept")
    lines.append(f"add rule {TABLE} {chain} meta l4proto tcp reject with tcp reset")
    lines.append(f"add rule {TABLE} {chain} reject")
    lines.append(f"add element {TABLE} sandboxes {{ {uid} : jump {chain} }}")
    return "\n".join(lines) + "\n"


def remove_script(sandbox_id: str, uid: int) -> str:
    """nft input that removes one sandbox's policy. Pure."""
    chain = chain_name(sandbox_id)
    return (
        f"delete element {TABLE} sandboxes {{ {uid} }}\n"
        f"flush chain {TABLE} {chain}\n"
        f"delete chain {TABLE} {chain}\n"
    )


def host_resolvers(resolv_conf: str | None = None) -> list[IPv4Address]:
    """The IPv4 name servers of /etc/resolv.conf: where the VMM's DNS forwarder sends the
    guest's queries."""
    if resolv_conf is None:
        try:
            resolv_conf = Path("/etc/resolv.conf").read_text()
        except OSError:
            return []
    out = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(IPv4Address(parts[1]))
            except ValueError:
                continue  # IPv6: the guest has none
    return out


def _nft() -> str:
    path = shutil.which(NFT) or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise HostToolMissing(NFT, "nftables")
    return path


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_nft(), "-f", "-"], input=script, capture_output=True, text=True)


def _lock_path() -> Path:
    from ..paths import state_dir

    path = state_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path / ".nft.lock"


def apply(
    sandbox_id: str, uid: int, rules: Sequence[EgressRule] | None, *, dns: bool = True
) -> None:
    """Install one sandbox's policy (creating the table first if needed); ``dns``: let
    the VMM's DNS forwarder reach the host's resolvers."""
    if os.geteuid() != 0:
        raise NetworkError(
            "an egress policy is enforced with nftables rules, which needs root; without "
            "root, nat sandboxes can only have allow=[] (no egress, no exposed ports)"
        )
    with open(_lock_path(), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _run(f"list table {TABLE}\n").returncode != 0:
            done = _run(base_script())
            if done.returncode != 0:
                raise NetworkError(f"cannot create the nftables table: {done.stderr.strip()}")
        resolvers = host_resolvers() if dns else []
        done = _run(sandbox_script(sandbox_id, uid, rules, resolvers))
    if done.returncode != 0:
        raise NetworkError(f"cannot install the egress policy: {done.stderr.strip()}")


def remove(sandbox_id: str, uid: int) -> bool:
    """Remove one sandbox's policy; False if there was none (or no nft)."""
    try:
        return _run(remove_script(sandbox_id, uid)).returncode == 0
    except HostToolMissing:
        return False


def installed() -> dict[str, int]:
    """chain name -> uid of every sandbox policy in the table (for ``gc``)."""
    try:
        out = _run(f"list map {TABLE} sandboxes\n")
    except HostToolMissing:
        return {}
    if out.returncode != 0:
        return {}
    found = {}
    text = out.stdout.replace("\n", " ")
    if "elements = {" in text:
        body = text.split("elements = {", 1)[1].split("}", 1)[0]
        for element in body.split(","):
            key, _, verdict = element.partition(":")
            words = verdict.split()
            if key.strip().isdigit() and len(words) == 2 and words[0] == "jump":
                found[words[1]] = int(key)
    return found


def sweep(live_uids: Iterable[int]) -> list[str]:
    """Remove the policies whose uid is not in ``live_uids`` (the uids VMMs run as now):
    what an owner that died at the wrong moment left. Returns the chains removed."""
    keep = set(live_uids)
    removed = []
    for chain, uid in installed().items():
        if uid not in keep and remove(chain, uid):
            removed.append(chain)
    return removed
