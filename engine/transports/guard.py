"""Addresses no hook may reach (the ``DESTINATION_DENY`` setting).

Hooks are configured by accounts, and their deliveries leave from the engine's own
machines: without a limit, a hook (or its test event, whose answer is shown to the
account) could reach what only those machines can, such as a cloud's metadata service
on 169.254.169.254, Redis or the Ray dashboard on 127.0.0.1, or hosts of a private
network. ``DESTINATION_DENY`` lists networks, or the names of groups of them, that no
delivery may connect to:

* ``link-local``: 169.254.0.0/16 and fe80::/10, where clouds serve their instance
  metadata and credentials;
* ``metadata``: the instance metadata addresses outside link-local (AWS's
  fd00:ec2::254, Alibaba Cloud's 100.100.100.200) and 169.254.169.254; the default
  is ``link-local,metadata``;
* ``loopback``: 127.0.0.0/8 and ::1, with 0.0.0.0/8 and :: (a connection to them
  reaches this machine too);
* ``private``: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 (shared
  address space) and fc00::/7 (unique local);
* any network or address, ``10.1.0.0/16`` or ``2001:db8::1``.

An IPv6 address that carries an IPv4 one (``::ffff:127.0.0.1``, NAT64's
``64:ff9b::7f00:1``, 6to4, Teredo, ``::127.0.0.1``) is refused when either is; a
network written as IPv4-mapped IPv6 (``::ffff:10.0.0.0/104``) is the IPv4 one.

The check is made on the address a connection is about to be opened to, after the
name was resolved, so a name that resolves to a denied address (at once, or only on
a later lookup) is refused too:

* HTTP: every connection of the transport's aiohttp session (batches and OAuth2
  token requests), through the connector's ``socket_factory``;
* RabbitMQ: the broker's connection, opened by this module and handed to aiormq;
* Kafka: every connection aiokafka opens (to a bootstrap server, then to each
  broker the cluster's metadata names, whenever that changes): the name is
  resolved and checked here, and a plain connection is made to an address checked;
  a TLS one is made to the name (its certificate is checked against it), so an
  address the name resolves to later can only be one that holds the name's
  certificate.

A refused connection is a connection error naming the address (not the network:
the operator's list is no account's business): the delivery is retried, then
dead-lettered, as for a host that cannot be reached; a test event reports it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
from typing import Any

import aiohappyeyeballs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

GROUPS: dict[str, tuple[str, ...]] = {
    "link-local": ("169.254.0.0/16", "fe80::/10"),
    # instance metadata outside link-local: AWS over IPv6, Alibaba Cloud
    "metadata": ("169.254.169.254/32", "fd00:ec2::254/128", "100.100.100.200/32"),
    "loopback": ("127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128"),
    "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"),
}
DEFAULT_DENY = "link-local,metadata"
MAX_ITEMS = 1_000
# IPv6 addresses that carry an IPv4 one a connection may end up at: NAT64 (RFC 6052's
# well-known prefix, the IPv4 address in the last 32 bits), IPv4-compatible (::a.b.c.d;
# :: and ::1 are judged as themselves). 6to4 and Teredo are read by ipaddress itself.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
# NAT64's local-use prefix, whose IPv4 address may sit anywhere in it: refused whole
# whenever an IPv4 network is denied
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


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
    separated by commas or spaces, or ``none`` (no network); a ValueError names a
    wrong item."""
    if text.strip() == "none":  # any address (not "None": str(None) of a template)
        return ()
    items = [item for item in re.split(r"[,\s]+", text) if item]
    if len(items) > MAX_ITEMS:
        raise ValueError(f"at most {MAX_ITEMS} items, got {len(items)}")
    networks: list[Network] = []
    for item in items:
        if item.lower() in GROUPS:
            networks += (ipaddress.ip_network(net) for net in GROUPS[item.lower()])
            continue
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            shown = item if len(item) <= 60 else item[:60] + "..."
            raise ValueError(f"{shown!r} is neither a network (such as 10.0.0.0/8 or "
                             f"fd00::/8), an address, nor one of {', '.join(GROUPS)}"
                             ) from None
        mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) \
            else None
        if mapped is not None and net.prefixlen >= 96:  # ::ffff:a.b.c.d/n: the IPv4 one
            net = ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}", strict=False)
        networks.append(net)
    return tuple(dict.fromkeys(networks))


def _addresses(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
               ) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """``ip`` and the IPv4 addresses an IPv6 one carries (a connection to it may
    reach them: mapped, NAT64, 6to4, Teredo, IPv4-compatible)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out += ip.teredo
    return out


class DestinationGuard:
    """Refuses connections to the networks of a DESTINATION_DENY value."""

    def __init__(self, deny: str = DEFAULT_DENY) -> None:
        self.deny = deny
        self.networks = parse_deny(deny)
        self._any_ipv4 = any(net.version == 4 for net in self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def reason(self, address: str) -> str | None:
        """Why ``address`` (an IP address, IPv6 perhaps with a %scope) is refused, or
        None when it is not."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return None  # not an IP address (a Unix socket path): nothing to judge
        shown = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and \
            ip.ipv4_mapped is not None else ip
        if self._any_ipv4 and isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64_LOCAL:
            return f"address {shown} is refused by DESTINATION_DENY"
        for each in _addresses(ip):
            if any(each.version == net.version and each in net for net in self.networks):
                # the network not named: the operator's list is no account's business
                return f"address {shown} is refused by DESTINATION_DENY"
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

    async def allowed(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` a connection may be made to, in the resolver's
        order; Denied naming them when every one is refused. A name that cannot be
        resolved raises the resolver's error (a lookup that failed here is not made
        again unchecked)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in infos))
        reasons = [self.reason(address) for address in addresses]
        if all(reasons):
            raise Denied("; ".join(dict.fromkeys(r for r in reasons if r)))
        return [a for a, reason in zip(addresses, reasons, strict=True) if reason is None]


def internal_open(deny: str) -> list[str]:
    """The groups of the engine's own network (``loopback``, ``private``) a
    DESTINATION_DENY value leaves open, in part or whole: an API that takes hooks from
    accounts lets their deliveries and test events reach the services there (and a
    test event's answer shows what they reply)."""
    try:
        denied = parse_deny(deny)
    except ValueError:
        return []  # refused where the setting is read
    # networks next to one another as one (10.0.0.0/9 and 10.128.0.0/9: 10.0.0.0/8)
    merged: list[Network] = [
        *ipaddress.collapse_addresses(d for d in denied if isinstance(d, ipaddress.IPv4Network)),
        *ipaddress.collapse_addresses(d for d in denied if isinstance(d, ipaddress.IPv6Network))]
    return [group for group in ("loopback", "private")
            if not all(any(net.version == d.version and net.subnet_of(d)  # type: ignore[arg-type]
                           for d in merged)
                       for net in map(ipaddress.ip_network, GROUPS[group]))]


def guard_for(deny: str | DestinationGuard | None) -> DestinationGuard:
    """A guard from a DESTINATION_DENY value (None: the default)."""
    if isinstance(deny, DestinationGuard):
        return deny
    return DestinationGuard(DEFAULT_DENY if deny is None else deny)
