"""Networking of a sandbox: its mode, its egress policy and its exposed ports.

- ``none`` (the default): no network device at all; the guest has loopback only.
- ``tap`` (root): a virtio-net device backed by a TAP of the host, from a pre-created
  pool (``host/tap.py``): the guest is routed and masqueraded by the host kernel, on
  a /30 of its own, and the host reaches it at its own address. The same allow lists
  apply, enforced in the forward and input hooks on the TAP.
- ``nat``: a virtio-net device backed by QEMU's user-mode network stack (slirp). The
  guest is 10.0.2.15/24 behind gateway 10.0.2.2, which is also how it reaches the host's
  loopback, with a DNS forwarder at 10.0.2.3. Every connection the guest makes leaves the
  host as a socket of its VMM, so the egress policy is enforced on the host, by the kernel,
  on that socket's owner: the VMM's own uid (``host/egress.py``; root), or by a
  seccomp guard on the VMM's connect and send calls (``host/netguard.py``; no root).

Egress policy (``allow``): entries are ``ADDRESS``, ``CIDR`` or ``HOSTNAME``, each with an
optional ``:PORT``. With ``allow=None`` the guest may reach any public address; private,
loopback, link-local, shared (CGNAT), multicast and reserved ranges are denied unless an
entry names them. With a list, only what it names is reachable. DNS through 10.0.2.3 always
works (the host's resolvers are allowed on port 53). Host names are resolved when the
sandbox starts; later changes to their addresses are not followed. IPv4 only: the guest
has no IPv6.

Refusals: whatever the policy refuses is reported on the host, with the rule that
refused it (``REFUSAL_RULES``): logged, counted and listed (``NetworkLog``, through
``sandbox.network_log()``; ``host/refusals.py``).

This module is pure: parsing, validation and address arithmetic, with no I/O except the
name resolution that ``resolve`` does when asked.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Final

from .errors import ConfigError, NetworkError, check_int


class NetworkMode(StrEnum):
    """A sandbox's network mode (``create(network=...)``; the strings are accepted too,
    and a mode compares equal to its string)."""

    NONE = "none"
    NAT = "nat"
    TAP = "tap"


NETWORK_MODES = tuple(m.value for m in NetworkMode)


class _InternalMode(str):
    """A mode that only NovaSandbox itself asks for: ``NetworkConfig`` accepts the one
    instance below, never a string of the same value from a caller."""

    __slots__ = ()


DETACHED: Final = _InternalMode("detached")
"""Internal mode: a network device with no backend (what the template snapshot that
networked sandboxes restore from is made with, so that it restores into either). Pass
this object itself (``network=DETACHED``): the string "detached" is refused."""
GUEST_NETWORK = IPv4Network("10.0.2.0/24")
GUEST_ADDRESS = IPv4Address("10.0.2.15")
GATEWAY = IPv4Address("10.0.2.2")
"""The guest's gateway; connections to it reach the host's loopback (127.0.0.1)."""
GUEST_DNS = IPv4Address("10.0.2.3")

NON_PUBLIC = tuple(
    IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)
"""Denied unless an allow entry names them: private, loopback, link-local, shared,
documentation, benchmarking, multicast and reserved ranges."""

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")


@dataclass(frozen=True, slots=True)
class EgressRule:
    """One allowed destination: a network and, optionally, one port (TCP and UDP)."""

    network: IPv4Network
    port: int | None = None


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """An ``allow`` entry as written, parsed: an address/network or a host name."""

    text: str
    network: IPv4Network | None
    host: str | None
    port: int | None


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"invalid port in allow entry {entry!r}")
    return int(text)


def parse_allow(entry: str) -> AllowEntry:
    """Parse ``ADDRESS``/``CIDR``/``HOSTNAME`` with an optional ``:PORT``. Pure."""
    if not isinstance(entry, str) or not entry or entry != entry.strip():
        raise ConfigError(f"invalid allow entry {entry!r}")
    target, port = entry, None
    if ":" in entry:
        target, _, port_text = entry.rpartition(":")
        port = _port(port_text, entry)
    try:
        return AllowEntry(entry, IPv4Network(target, strict=False), None, port)
    except ValueError:
        pass
    if "/" in target or not _HOSTNAME.fullmatch(target) or target.replace(".", "").isdigit():
        raise ConfigError(
            f"allow entry {entry!r} is not an IPv4 address, network or host name "
            "(optionally followed by :PORT)"
        )
    return AllowEntry(entry, None, target.lower().rstrip("."), port)


def _resolve_ipv4(host: str) -> list[IPv4Address]:
    infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    return sorted({IPv4Address(info[4][0]) for info in infos})


def resolve(
    entries: Sequence[AllowEntry],
    lookup: Callable[[str], list[IPv4Address]] = _resolve_ipv4,
) -> tuple[EgressRule, ...]:
    """The rules of ``entries``, host names looked up (``NetworkError`` if one fails)."""
    rules: list[EgressRule] = []
    for entry in entries:
        if entry.network is not None:
            rules.append(EgressRule(entry.network, entry.port))
            continue
        assert entry.host is not None
        try:
            addresses = lookup(entry.host)
        except OSError as exc:
            raise NetworkError(f"cannot resolve {entry.host!r} for the allow list: {exc}") from exc
        if not addresses:
            raise NetworkError(f"{entry.host!r} has no IPv4 address")
        rules += [EgressRule(IPv4Network(a), entry.port) for a in addresses]
    return tuple(dict.fromkeys(rules))


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A sandbox's network: ``mode``, egress ``allow`` list (None: the public internet)
    and guest TCP ``ports`` exposed on the host's loopback."""

    mode: NetworkMode | str = NetworkMode.NONE
    """A ``NetworkMode`` once constructed (or the internal ``DETACHED``)."""
    allow: tuple[str, ...] | None = None
    ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode is not DETACHED:
            try:
                mode = NetworkMode(self.mode)
            except (ValueError, TypeError):
                choices = ", ".join(NETWORK_MODES)
                raise ConfigError(f"network must be one of {choices}, got {self.mode!r}") from None
            object.__setattr__(self, "mode", mode)
        allow = self.allow
        if allow is not None:
            if isinstance(allow, str) or not isinstance(allow, Sequence):
                raise ConfigError("allow must be a list of strings or None")
            allow = tuple(allow)
            for entry in allow:
                parse_allow(entry)
        ports = self.ports
        if isinstance(ports, (str, bytes)) or not isinstance(ports, Sequence):
            raise ConfigError("ports must be a list of port numbers")
        ports = tuple(ports)
        for port in ports:
            check_int("a port", port, 1, 65535)
        if len(set(ports)) != len(ports):
            raise ConfigError(f"a port is listed twice: {list(ports)}")
        if self.mode in (NetworkMode.NONE, DETACHED) and (allow is not None or ports):
            raise ConfigError('allow and ports need a network: pass network="nat" or "tap"')
        object.__setattr__(self, "allow", allow)
        object.__setattr__(self, "ports", ports)

    @property
    def enabled(self) -> bool:
        return self.mode != NetworkMode.NONE

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": str(self.mode),
            "allow": None if self.allow is None else list(self.allow),
            "ports": list(self.ports),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NetworkConfig:
        """What ``to_json`` wrote (a record's; the internal mode included)."""
        mode = DETACHED if data["mode"] == str(DETACHED) else data["mode"]
        allow = data["allow"]
        return cls(mode, None if allow is None else tuple(allow), tuple(data["ports"]))

    def entries(self) -> tuple[AllowEntry, ...]:
        return tuple(parse_allow(e) for e in self.allow or ())


def guest_mac(sandbox_id: str) -> str:
    """A locally administered unicast MAC derived from the sandbox id. Pure."""
    digest = hashlib.sha256(sandbox_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, 0x4E, *digest[:4]))


def egress_refusal(
    rules: Sequence[EgressRule] | None,
    address: IPv4Address,
    port: int,
    resolvers: Sequence[IPv4Address] = (),
) -> str | None:
    """The rule (a ``REFUSAL_RULES`` code) by which the policy refuses ``address:port``,
    or None when it lets the guest reach it: the same decision the nftables chains make
    (``host/egress.py``), for the seccomp guard of VMMs run without root
    (``host/netguard.py``). ``rules=None``: the public internet. Pure."""
    if port == 53 and address in resolvers:
        return None
    for rule in rules or ():
        if address in rule.network and (rule.port is None or rule.port == port):
            return None
    if rules is None:
        return None if is_public(address) else "non-public"
    return "no-egress" if not rules else "allow-list"


def egress_allows(
    rules: Sequence[EgressRule] | None,
    address: IPv4Address,
    port: int,
    resolvers: Sequence[IPv4Address] = (),
) -> bool:
    """Whether the policy lets the guest reach ``address:port`` (``egress_refusal``)."""
    return egress_refusal(rules, address, port, resolvers) is None


def is_public(address: IPv4Address) -> bool:
    return not any(address in net for net in NON_PUBLIC)


# --- refused connections

REFUSAL_RULES = {
    "allow-list": "not in the allow list",
    "no-egress": "no egress at all (allow=[])",
    "non-public": "non-public range",
    "source": "not sent from the guest's own address",
    "not-ipv4": "not IPv4 (the guest has no IPv6)",
    "unreadable": "destination unreadable",
}
"""The rules of an egress policy that refuse traffic, by code: the code travels in the
kernel's log prefix (``host/egress.py``) or comes from the seccomp guard's decision;
``describe_refusal`` words it for people."""


def describe_refusal(code: str, address: str) -> str:
    """What a rule code means for one destination, e.g. "non-public range
    203.0.113.0/24". Pure."""
    text = REFUSAL_RULES.get(code, code)
    if code == "non-public":
        try:
            ip = IPv4Address(address)
        except ValueError:
            return text
        return next((f"{text} {net}" for net in NON_PUBLIC if ip in net), text)
    return text


@dataclass(frozen=True, slots=True)
class RefusedConnection:
    """One connection (or datagram) of the guest that the egress policy refused."""

    time: float
    """When the host saw it (``time.time()`` seconds)."""
    protocol: str
    """"tcp", "udp", "icmp", or the IP protocol number."""
    address: str
    port: int | None
    """The destination port (None for protocols without ports)."""
    rule: str
    """Which rule refused it, e.g. "not in the allow list", "non-public range
    10.0.0.0/8"."""

    @property
    def destination(self) -> str:
        where = self.address if self.port is None else f"{self.address}:{self.port}"
        return f"{self.protocol} {where}"

    def to_json(self) -> dict[str, object]:
        return {
            "time": self.time,
            "protocol": self.protocol,
            "address": self.address,
            "port": self.port,
            "rule": self.rule,
        }

    @classmethod
    def from_json(cls, data: object) -> RefusedConnection | None:
        """The entry a line of the log file holds; None if it is not one."""
        if not isinstance(data, dict):
            return None
        port = data.get("port")
        values = (data.get("time"), data.get("protocol"), data.get("address"), data.get("rule"))
        when, protocol, address, rule = values
        if (
            not isinstance(when, (int, float))
            or not isinstance(protocol, str)
            or not isinstance(address, str)
            or not isinstance(rule, str)
            or not (port is None or (isinstance(port, int) and not isinstance(port, bool)))
        ):
            return None
        return cls(float(when), protocol, address, port, rule)


@dataclass(frozen=True, slots=True)
class NetworkLog:
    """What a sandbox's egress policy refused: ``refused`` counts every refused
    connection attempt (a TCP connection, or a UDP datagram); ``entries`` are the most
    recent of those logged (at most ``MAX_ENTRIES``; a guest that keeps hammering has
    only about 50 a second logged, but every one counted)."""

    refused: int
    entries: tuple[RefusedConnection, ...]

    MAX_ENTRIES = 1000

    @property
    def not_listed(self) -> int:
        """Refusals counted but not in ``entries`` (rate-limited, or older ones)."""
        return max(0, self.refused - len(self.entries))

    def summary(self, limit: int = 3) -> str:
        """One line: how many were refused, and the distinct destinations first seen."""
        seen: dict[tuple[str, str], None] = {}
        for entry in self.entries:
            seen.setdefault((entry.destination, entry.rule), None)
        shown = [f"{dest} ({rule})" for dest, rule in list(seen)[:limit]]
        more = len(seen) - len(shown)
        what = "connection" if self.refused == 1 else "connections"
        text = f"the network policy refused {self.refused} {what}"
        if shown:
            text += ": " + ", ".join(shown) + (f" and {more} more" if more > 0 else "")
        return text

    def to_json(self) -> dict[str, object]:
        return {"refused": self.refused, "entries": [e.to_json() for e in self.entries]}
