"""DESTINATION_DENY's networks and how an address is judged (engine.transports.guard)."""

from __future__ import annotations

import pytest

from engine.transports.guard import MAX_ITEMS, Denied, DestinationGuard, guard_for, parse_deny


@pytest.mark.parametrize(("address", "network"), [
    ("169.254.169.254", "169.254.0.0/16"),       # a cloud's metadata service
    ("fe80::1%eth0", "fe80::/10"),               # with a scope id
    ("::ffff:169.254.169.254", "169.254.0.0/16"),  # IPv4 written as IPv6
])
def test_the_default_denies_link_local(address: str, network: str) -> None:
    assert DestinationGuard().reason(address) == \
        f"address {address.split('%')[0].removeprefix('::ffff:')} is in DESTINATION_DENY " \
        f"({network})"


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "::1", "93.184.215.14",
                                     "not-an-address", "/run/sock"])
def test_the_default_allows_the_rest(address: str) -> None:
    assert DestinationGuard().reason(address) is None


def test_groups_cover_the_addresses_that_reach_this_machine_or_a_private_network() -> None:
    guard = DestinationGuard("loopback, private")
    for address in ("127.0.0.1", "127.9.9.9", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1",
                    "10.0.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1", "fd00::1"):
        assert guard.reason(address) is not None, address
    for address in ("172.32.0.1", "8.8.8.8", "2001:db8::1", "169.254.169.254"):
        assert guard.reason(address) is None, address
    with pytest.raises(Denied, match=r"^address 10\.0\.0\.1 is in DESTINATION_DENY "
                                     r"\(10\.0\.0\.0/8\)$"):
        guard.check("10.0.0.1")


def test_networks_addresses_and_separators() -> None:
    assert [str(n) for n in parse_deny(" 10.1.0.0/16,2001:db8::1\n192.0.2.7/24 10.1.0.0/16")] \
        == ["10.1.0.0/16", "2001:db8::1/128", "192.0.2.0/24"]  # host bits dropped, once each
    assert parse_deny("") == parse_deny(" , ") == ()
    assert not DestinationGuard("") and DestinationGuard("LOOPBACK")
    assert guard_for(None).deny == "link-local" and guard_for("").networks == ()


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
