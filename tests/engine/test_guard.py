"""DESTINATION_DENY's networks and how an address is judged (engine.transports.guard)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from engine.transports.guard import MAX_ITEMS, Denied, DestinationGuard, guard_for, parse_deny

REFUSED = "is refused by DESTINATION_DENY"


@pytest.mark.parametrize(("address", "shown"), [
    ("169.254.169.254", "169.254.169.254"),      # a cloud's metadata service
    ("fe80::1%eth0", "fe80::1"),                 # with a scope id
    ("::ffff:169.254.169.254", "169.254.169.254"),  # IPv4 written as IPv6
    ("fd00:ec2::254", "fd00:ec2::254"),          # AWS's metadata over IPv6
    ("100.100.100.200", "100.100.100.200"),      # Alibaba Cloud's
])
def test_the_default_denies_link_local_and_metadata(address: str, shown: str) -> None:
    assert DestinationGuard().reason(address) == f"address {shown} {REFUSED}"


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "::1", "93.184.215.14",
                                     "100.100.100.201", "not-an-address", "/run/sock"])
def test_the_default_allows_the_rest(address: str) -> None:
    assert DestinationGuard().reason(address) is None


def test_groups_cover_the_addresses_that_reach_this_machine_or_a_private_network() -> None:
    guard = DestinationGuard("loopback, private")
    for address in ("127.0.0.1", "127.9.9.9", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1",
                    "10.0.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1", "fd00::1"):
        assert guard.reason(address) is not None, address
    for address in ("172.32.0.1", "8.8.8.8", "2001:db8::1", "169.254.169.254"):
        assert guard.reason(address) is None, address
    with pytest.raises(Denied, match=rf"^address 10\.0\.0\.1 {REFUSED}$"):
        guard.check("10.0.0.1")


@pytest.mark.parametrize("address", [
    "64:ff9b::7f00:1",          # NAT64 of 127.0.0.1
    "64:ff9b::a00:5",           # NAT64 of 10.0.0.5
    "64:ff9b:1::a00:5",         # NAT64's local-use prefix: refused whole
    "2002:a9fe:a9fe::1",        # 6to4 of 169.254.169.254
    "::127.0.0.1",              # IPv4-compatible
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo of client 10.0.0.1
])
def test_an_ipv6_address_that_carries_a_denied_ipv4_one_is_refused(address: str) -> None:
    assert DestinationGuard("loopback,private,link-local").reason(address) is not None
    assert DestinationGuard("2001:db8::/32").reason(address) is None  # no IPv4 denied


def test_a_network_written_as_ipv4_mapped_ipv6_is_the_ipv4_one() -> None:
    assert [str(n) for n in parse_deny("::ffff:10.0.0.0/104, ::ffff:169.254.169.254")] == \
        ["10.0.0.0/8", "169.254.169.254/32"]
    assert DestinationGuard("::ffff:169.254.169.254").reason("169.254.169.254") is not None


def test_networks_addresses_and_separators() -> None:
    assert [str(n) for n in parse_deny(" 10.1.0.0/16,2001:db8::1\n192.0.2.7/24 10.1.0.0/16")] \
        == ["10.1.0.0/16", "2001:db8::1/128", "192.0.2.0/24"]  # host bits dropped, once each
    assert parse_deny("") == parse_deny(" , ") == ()
    assert not DestinationGuard("") and DestinationGuard("LOOPBACK")
    assert guard_for(None).deny == "link-local,metadata" and guard_for("").networks == ()


@pytest.mark.parametrize(("text", "reason"), [
    ("loopbak", "'loopbak' is neither a network"),
    ("10.0.0.0/33", "'10.0.0.0/33' is neither a network"),
    ("x" * 100, "'" + "x" * 60 + "...' is neither"),
    ("10.0.0.1," * (MAX_ITEMS + 1), f"at most {MAX_ITEMS} items"),
])
def test_wrong_items_are_named(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="^" + reason.replace(".", r"\.").replace("(", r"\(")
                       .replace(")", r"\)")):
        parse_deny(text)


def test_allowed_gives_the_addresses_a_name_may_be_reached_at(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only those not refused, in the resolver's order; Denied when none is left."""
    answers = {"dual.example": ["fd00::5", "203.0.113.7", "10.0.0.9"],
               "inside.example": ["10.0.0.9", "fd00::5"]}

    async def getaddrinfo(host: str, port: int, **_: object) -> list[tuple[object, ...]]:
        if host not in answers:
            raise socket.gaierror("Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    guard = DestinationGuard("private")

    async def run(host: str) -> list[str]:
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        return await guard.allowed(host, 9092)

    assert asyncio.run(run("dual.example")) == ["203.0.113.7"]
    with pytest.raises(socket.gaierror):  # not looked up again, unchecked, by the client
        asyncio.run(run("unknown.example"))
    with pytest.raises(Denied, match=rf"^address 10\.0\.0\.9 {REFUSED}; address fd00::5 "):
        asyncio.run(run("inside.example"))
