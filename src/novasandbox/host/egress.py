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
            [with no allow list: the non-public ranges refused, then accept]
            refused                                  # the rest
        }
    }

Each refusal is two or three rules: a rate-limited ``log group N prefix
"nsb:<id>:<rule>"`` (NFLOG to the owner process's group, ``nflog.py``: that is how the
owner hears of it), then the reject itself with a ``counter`` (every refusal counted,
logged or not: ``refused_count``).

A sandbox's chain and map element are added before its VMM starts and deleted after it
exits (and by ``gc``), each in one atomic ``nft -f`` transaction. Root is needed to change
the ruleset, which is also when VMMs have uids of their own.

TAP sandboxes (``tap.py``) use the same sandbox chains in a second table, ``ip
novasandbox_tap`` (in the TAPs' network namespace), keyed on the TAP the guest's packets
come in by, in the forward and input hooks, with the pool's masquerade rule.

``sandbox_script``/``remove_script`` are pure (they return nft's input) and unit-tested;
``apply`` runs ``nft``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from ..errors import HostToolMissing, NetworkError
from ..network import NON_PUBLIC, EgressRule
from ..paths import state_dir
from . import nflog
from .plan import VMM_ID_BASE, VMM_ID_COUNT

NFT = "nft"


@dataclass(frozen=True, slots=True)
class PolicyTable:
    """An nftables table of sandbox policies: its name, what its map is keyed on, its
    base chains, and the network namespace it lives in (None: the host's)."""

    name: str
    key_type: str
    base: tuple[str, ...]
    netns: str | None = None

    def key(self, value: int | str) -> str:
        return str(value) if self.key_type == "uid" else f'"{value}"'


def _uid_base() -> tuple[str, ...]:
    t = "inet novasandbox"
    uids = f"{VMM_ID_BASE}-{VMM_ID_BASE + VMM_ID_COUNT - 1}"
    return (
        f"add table {t}",
        f"add map {t} sandboxes {{ type uid : verdict ; }}",
        f"add chain {t} output {{ type filter hook output priority 0 ; policy accept ; }}",
        f"add rule {t} output meta skuid {uids} meta skuid vmap @sandboxes",
        f"add rule {t} output meta skuid {uids} meta l4proto tcp reject with tcp reset",
        f"add rule {t} output meta skuid {uids} reject",
    )


UID_TABLE = PolicyTable("inet novasandbox", "uid", _uid_base())
"""The policies of "nat" sandboxes, keyed on their VMM's uid (output hook)."""


def tap_table(subnet: str, prefix: str, netns: str | None) -> PolicyTable:
    """The policies of "tap" sandboxes, keyed on their TAP (forward and input hooks), with
    the masquerade of the TAPs' ``subnet`` out of any other interface."""
    t = "ip novasandbox_tap"
    taps = f'"{prefix}*"'
    return PolicyTable(
        t,
        "ifname",
        (
            f"add table {t}",
            f"add map {t} sandboxes {{ type ifname : verdict ; }}",
            f"add chain {t} forward {{ type filter hook forward priority 0 ; policy accept ; }}",
            f"add rule {t} forward iifname {taps} iifname vmap @sandboxes",
            f"add rule {t} forward iifname {taps} meta l4proto tcp reject with tcp reset",
            f"add rule {t} forward iifname {taps} reject",
            f"add rule {t} forward oifname {taps} ct state established,related accept",
            f"add rule {t} forward oifname {taps} drop",
            f"add chain {t} input {{ type filter hook input priority 0 ; policy accept ; }}",
            f"add rule {t} input iifname {taps} iifname vmap @sandboxes",
            f"add rule {t} input iifname {taps} meta l4proto tcp reject with tcp reset",
            f"add rule {t} input iifname {taps} reject",
            f"add chain {t} postrouting {{ type nat hook postrouting priority 100 ; }}",
            f"add rule {t} postrouting ip saddr {subnet} oifname != {taps} masquerade",
        ),
        netns,
    )


def chain_name(sandbox_id: str) -> str:
    return "sb-" + sandbox_id.removeprefix("sb-")


def base_script(table: PolicyTable = UID_TABLE) -> str:
    """The table, its map and its base chains (applied once, when the table is absent)."""
    return "\n".join(table.base) + "\n"


def _match(rule: EgressRule) -> str:
    where = f"ip daddr {rule.network}"
    if rule.port is not None:
        where += f" meta l4proto {{ tcp, udp }} th dport {rule.port}"
    return where


def _refuse(
    sandbox_id: str, code: str, match: str, log_group: int | None, verdict: str = "reject"
) -> list[str]:
    """The rules that refuse what ``match`` matches by the rule named ``code``
    (``network.REFUSAL_RULES``): a rate-limited log of it to ``log_group`` (NFLOG, the
    owner's), then the refusal, counted (every one, logged or not)."""
    where = f"{match} " if match else ""
    out = []
    if log_group is not None:
        prefix = nflog.log_prefix(sandbox_id, code)
        out.append(
            f"{where}limit rate {nflog.RATE_PER_SECOND}/second burst {nflog.BURST} packets "
            f'log group {log_group} snaplen {nflog.COPY_RANGE} prefix "{prefix}"'
        )
    if verdict == "reject":
        out.append(f"{where}meta l4proto tcp counter reject with tcp reset")
        out.append(f"{where}counter reject")
    else:
        out.append(f"{where}counter {verdict}")
    return out


def sandbox_script(
    sandbox_id: str,
    key: int | str,
    rules: Sequence[EgressRule] | None,
    resolvers: Iterable[IPv4Address],
    table: PolicyTable = UID_TABLE,
    source: IPv4Address | None = None,
    log_group: int | None = None,
) -> str:
    """nft input that installs the policy of one sandbox, whose traffic the table knows
    by ``key`` (a uid or an interface). ``rules=None`` means the public internet (every
    non-public range denied); a sequence means those destinations only. ``source``: the
    only source address its packets may carry (a TAP guest's; others are dropped).
    Every refusal is counted and, with ``log_group``, logged there (``nflog``). Pure."""
    t, chain = table.name, chain_name(sandbox_id)
    body: list[str] = []
    if source is not None:
        body += _refuse(sandbox_id, "source", f"ip saddr != {source}", log_group, "drop")
    body.append("ct state established,related accept")
    for resolver in sorted(set(resolvers)):
        body.append(f"ip daddr {resolver} udp dport 53 accept")
        body.append(f"ip daddr {resolver} tcp dport 53 accept")
    for rule in rules or ():
        body.append(f"{_match(rule)} accept")
    if rules is None:
        private = ", ".join(str(n) for n in NON_PUBLIC)
        body += _refuse(sandbox_id, "non-public", f"ip daddr {{ {private} }}", log_group)
        body.append("meta nfproto ipv4 accept")
        last = "not-ipv4"
    else:
        last = "allow-list" if rules else "no-egress"
    body += _refuse(sandbox_id, last, "", log_group)
    lines = [f"add chain {t} {chain}", *(f"add rule {t} {chain} {rule}" for rule in body)]
    lines.append(f"add element {t} sandboxes {{ {table.key(key)} : jump {chain} }}")
    return "\n".join(lines) + "\n"


def remove_script(sandbox_id: str, key: int | str, table: PolicyTable = UID_TABLE) -> str:
    """nft input that removes one sandbox's policy. Pure."""
    t, chain = table.name, chain_name(sandbox_id)
    return (
        f"delete element {t} sandboxes {{ {table.key(key)} }}\n"
        f"flush chain {t} {chain}\n"
        f"delete chain {t} {chain}\n"
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


def run_in(
    netns: str | None, argv: list[str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in network namespace ``netns`` (an ``ip netns`` name; None: this
    one). ``nsenter`` enters only the network namespace; ``ip netns exec`` would also
    remount /sys in a mount namespace of its own, which fails where / is not a mount
    point (a chroot)."""
    if netns is not None:
        argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True)


def _run(script: str, table: PolicyTable = UID_TABLE) -> subprocess.CompletedProcess[str]:
    return run_in(table.netns, [_nft(), "-f", "-"], script)


def _lock_path() -> Path:
    path = state_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path / ".nft.lock"


def ensure_table(table: PolicyTable) -> None:
    """Create ``table`` unless it is there (under a lock, so two processes do not both
    add its base rules)."""
    with open(_lock_path(), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _run(f"list table {table.name}\n", table).returncode != 0:
            done = _run(base_script(table), table)
            if done.returncode != 0:
                raise NetworkError(f"cannot create the nftables table: {done.stderr.strip()}")


def apply(
    sandbox_id: str,
    key: int | str,
    rules: Sequence[EgressRule] | None,
    *,
    dns: bool = True,
    resolvers: Iterable[IPv4Address] | None = None,
    table: PolicyTable = UID_TABLE,
    source: IPv4Address | None = None,
    log_group: int | None = None,
) -> None:
    """Install one sandbox's policy (creating the table first if needed); ``dns``: let
    the guest's DNS traffic reach ``resolvers`` (default: the host's); ``log_group``:
    the NFLOG group its refusals are logged to."""
    if os.geteuid() != 0:
        raise NetworkError(
            "an egress policy is enforced with nftables rules, which needs root; without "
            "root, nat sandboxes can only have allow=[] (no egress, no exposed ports)"
        )
    servers = (host_resolvers() if resolvers is None else list(resolvers)) if dns else []
    script = sandbox_script(sandbox_id, key, rules, servers, table, source, log_group)
    done = _run(script, table)  # one nft call when the table is there (the usual case)
    if done.returncode != 0:
        ensure_table(table)
        done = _run(script, table)
    if done.returncode != 0:
        raise NetworkError(f"cannot install the egress policy: {done.stderr.strip()}")


def remove(sandbox_id: str, key: int | str, table: PolicyTable = UID_TABLE) -> bool:
    """Remove one sandbox's policy; False if there was none (or no nft)."""
    try:
        return _run(remove_script(sandbox_id, key, table), table).returncode == 0
    except HostToolMissing:
        return False


def chain_counters(listing: str) -> int | None:
    """The sum of the counters of a chain listed by ``nft -j``: in a sandbox chain, the
    packets its refusal rules refused. None if the listing is not one. Pure."""
    try:
        data = json.loads(listing)
    except ValueError:
        return None
    items = data.get("nftables") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return None
    total = 0
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        exprs = rule.get("expr") if isinstance(rule, dict) else None
        for expr in exprs if isinstance(exprs, list) else ():
            counter = expr.get("counter") if isinstance(expr, dict) else None
            if isinstance(counter, dict) and isinstance(counter.get("packets"), int):
                total += counter["packets"]
    return total


def refused_count(sandbox_id: str, table: PolicyTable = UID_TABLE) -> int | None:
    """How many packets one sandbox's policy has refused so far (its chain's counters);
    None if the chain cannot be read."""
    argv = [_nft(), "-j", "list", "chain", *table.name.split(), chain_name(sandbox_id)]
    try:
        done = run_in(table.netns, argv)
    except (HostToolMissing, OSError):
        return None
    return chain_counters(done.stdout) if done.returncode == 0 else None


def installed(table: PolicyTable = UID_TABLE) -> dict[str, str]:
    """chain name -> key (uid or interface) of every sandbox policy in ``table``."""
    try:
        out = _run(f"list map {table.name} sandboxes\n", table)
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
            if key.strip() and len(words) == 2 and words[0] == "jump":
                found[words[1]] = key.strip().strip('"')
    return found


def sweep(live_uids: Iterable[int]) -> list[str]:
    """Remove the "nat" policies whose uid is not in ``live_uids`` (the uids VMMs run as
    now): what an owner that died at the wrong moment left. Returns the chains removed."""
    keep = {str(uid) for uid in live_uids}
    removed = []
    for chain, uid in installed().items():
        if uid not in keep and uid.isdigit() and remove(chain, int(uid)):
            removed.append(chain)
    return removed
