"""Addresses no hook may reach (the ``DESTINATION_DENY`` setting).

Hooks are configured by accounts, and their deliveries leave from the engine's own
machines: without a limit, a hook (or its test event, whose answer is shown to the
account) could reach what only those machines can, such as a cloud's metadata service
on 169.254.169.254, Redis or the Ray dashboard on 127.0.0.1, or hosts of a private
network. ``DESTINATION_DENY`` lists networks, or the names of groups of them, that no
delivery may connect to:

* ``link-local`` (the default): 169.254.0.0/16 and fe80::/10, where clouds serve
  their instance metadata and credentials;
* ``loopback``: 127.0.0.0/8 and ::1, with 0.0.0.0/8 and :: (a connection to them
  reaches this machine too);
* ``private``: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 (shared
  address space) and fc00::/7 (unique local);
* any network or address, ``10.1.0.0/16`` or ``2001:db8::1``.

An IPv4 address written as IPv6 (``::ffff:127.0.0.1``) is judged as the IPv4 address.

The check is made on the address a connection is about to be opened to, after the
name was resolved, so a name that resolves to a denied address (at once, or only on
a later lookup) is refused too:

* HTTP: every connection of the transport's aiohttp session (batches and OAuth2
  token requests), through the connector's ``socket_factory``;
* RabbitMQ: the broker's connection, opened by this module and handed to aiormq;
* Kafka: aiokafka opens its connections itself, so the names are resolved and
  checked before a producer starts (the bootstrap servers) and once it has started
  (every broker the cluster's metadata names); a name resolved to another address
  later, by aiokafka's own lookup, is not checked again.

A refused connection is a connection error naming the address and the network that
refuses it: the delivery is retried, then dead-lettered, as for a host that cannot be
reached; a test event reports it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any

import aiohappyeyeballs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

GROUPS: dict[str, tuple[str, ...]] = {
    "link-local": ("169.254.0.0/16", "fe80::/10"),
    "loopback": ("127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128"),
    "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"),
}
DEFAULT_DENY = "link-local"
MAX_ITEMS = 1_000


class Denied(OSError):
    """A connection to an address DESTINATION_DENY refuses (an OSError, EACCES, so
    that the clients report it as they report any address that cannot be connected
    to); its text is the reason alone."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EACCES, reason)

    def __str__(self) -> str:
        return str(self.strerror)


def parse_deny(text: str) -> tuple[Network, ...]:
    """The networks of a DESTINATION_DENY value: names of groups and networks,
    separated by commas or spaces; a ValueError names a wrong item."""
    items = [item for item in re.split(r"[,\s]+", text) if item]
    if len(items) > MAX_ITEMS:
        raise ValueError(f"at most {MAX_ITEMS} items, got {len(items)}")
    networks: list[Network] = []
    for item in items:
        if item.lower() in GROUPS:
            networks += (ipaddress.ip_network(net) for net in GROUPS[item.lower()])
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            shown = item if len(item) <= 60 else item[:60] + "..."
            raise ValueError(f"{shown!r} is neither a network (such as 10.0.0.0/8 or "
                             f"fd00::/8), an address, nor one of {', '.join(GROUPS)}"
                             ) from None
    return tuple(dict.fromkeys(networks))


class DestinationGuard:
    """Refuses connections to the networks of a DESTINATION_DENY value."""

    def __init__(self, deny: str = DEFAULT_DENY) -> None:
        self.deny = deny
        self.networks = parse_deny(deny)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def reason(self, address: str) -> str | None:
        """Why ``address`` (an IP address, IPv6 perhaps with a %scope) is refused, or
        None when it is not."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return None  # not an IP address (a Unix socket path): nothing to judge
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for net in self.networks:
            if ip.version == net.version and ip in net:
                return f"address {ip} is in DESTINATION_DENY ({net})"
        return None

    def check(self, address: str) -> None:
        """Raise Denied when ``address`` is refused."""
        reason = self.reason(address)
        if reason is not None:
            raise Denied(reason)

    def socket_factory(self, addr_info: Any) -> socket.socket:
        """For aiohttp's connector (and aiohappyeyeballs): the socket of one resolved
        address, or Denied."""
        family, type_, proto, _, sockaddr = addr_info
        self.check(sockaddr[0])
        return socket.socket(family=family, type=type_, proto=proto)

    async def connect(self, host: str, port: int) -> socket.socket:
        """A socket connected to ``host``:``port``: its addresses are tried in turn,
        the refused ones failing with Denied (an OSError naming them all when no
        address is left)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return await aiohappyeyeballs.start_connection(infos,
                                                       socket_factory=self.socket_factory)

    async def check_hosts(self, hosts: Iterable[tuple[str, int]]) -> None:
        """Resolve each (host, port) and raise Denied naming the first refused address;
        a name that cannot be resolved is left to the client to report."""
        loop = asyncio.get_running_loop()
        for host, port in hosts:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                continue
            for *_, sockaddr in infos:
                reason = self.reason(str(sockaddr[0]))
                if reason is not None:
                    raise Denied(f"{host}:{port}: {reason}")


def guard_for(deny: str | DestinationGuard | None) -> DestinationGuard:
    """A guard from a DESTINATION_DENY value (None: the default)."""
    if isinstance(deny, DestinationGuard):
        return deny
    return DestinationGuard(DEFAULT_DENY if deny is None else deny)
