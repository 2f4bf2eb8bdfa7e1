"""Filters of facepipe_site: checks of IP addresses and prefixes with Python's ipaddress module."""

from __future__ import annotations

import ipaddress
from typing import Any

# Shorter prefixes than these would let most of the internet scrape (and, on face-detector, reach
# any address through IPAddressAllow=): refused.
MIN_PREFIX = {4: 8, 6: 32}


def metrics_problems(port: Any, address: Any, scrapers: Any, role: str, taken: Any = None) -> list[str]:
    """What is wrong with a role's metrics port, address and scrapers (empty: nothing).

    ``taken``: {port: what uses it} on the same host (the brokers' listeners, the other service)."""
    problems: list[str] = []
    try:
        number = int(str(port))
    except ValueError:
        number = -1
    if number != 0 and not 1024 <= number <= 65535:
        problems.append(
            f"{role}_metrics_port ({port}) must be 0 (off) or 1024 to 65535 (the service runs "
            "unprivileged and cannot open a lower port)"
        )
    for other, user in (taken or {}).items():
        if number > 0 and str(other) == str(number):
            problems.append(f"{role}_metrics_port ({port}) is taken on this host by {user}")
    try:
        bind = ipaddress.ip_address(str(address))
    except ValueError:
        problems.append(f"{role}_metrics_address ({address}) must be an IP address, not a host name")
        bind = None
    if not isinstance(scrapers, list):
        return [*problems, f"{role}_metrics_scrapers must be a list of addresses or prefixes"]
    networks = []
    for item in scrapers:
        text = str(item)
        if "%" in text or ("/" in text and not text.split("/", 1)[1].isdigit()):
            problems.append(
                f"{role}_metrics_scrapers: {item!r}: write an address or address/length "
                "(no zone, no netmask: systemd's IPAddressAllow= ignores those)"
            )
            continue
        try:
            network = ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            problems.append(f"{role}_metrics_scrapers: {item!r} is not an address or prefix")
            continue
        if network.prefixlen < MIN_PREFIX[network.version]:
            problems.append(
                f"{role}_metrics_scrapers: {item} would let nearly any host scrape: list the "
                "Prometheus servers' addresses or a narrow prefix"
            )
        if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
            problems.append(f"{role}_metrics_scrapers: write {item} as its IPv4 address")
        networks.append(network)
    if number > 0 and bind is not None:
        if bind.is_loopback and networks:
            problems.append(
                f"{role}_metrics_address ({address}) is loopback: the scrapers cannot reach it; "
                "set 0.0.0.0, :: or this host's address"
            )
        if not bind.is_loopback and not networks:
            problems.append(
                f"{role}_metrics_address ({address}) is not loopback but no "
                f"{role}_metrics_scrapers are listed: only this host may scrape, so keep 127.0.0.1 "
                "or list the Prometheus servers"
            )
        if bind.version == 4 and any(n.version == 6 for n in networks):
            problems.append(f"{role}_metrics_address ({address}) is IPv4: IPv6 scrapers cannot reach it (use ::)")
        if bind.version == 6 and not bind.is_unspecified and any(n.version == 4 for n in networks):
            problems.append(
                f"{role}_metrics_address ({address}) is one IPv6 address: IPv4 scrapers cannot "
                "reach it (use 0.0.0.0 or ::)"
            )
    return problems


def source_problems(sources: Any, variable: str) -> list[str]:
    """What is wrong with a list of addresses or prefixes a firewall lets in (empty: nothing)."""
    if not isinstance(sources, list):
        return [f"{variable} must be a list of addresses or prefixes"]
    problems = []
    for item in sources:
        text = str(item)
        try:
            if "%" in text or ("/" in text and not text.split("/", 1)[1].isdigit()):
                raise ValueError
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            problems.append(
                f"{variable}: {item!r} is not an IPv4 or IPv6 address or address/length (no host name, zone or netmask)"
            )
            continue
        if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
            problems.append(f"{variable}: write {item} as its IPv4 address (the IPv4 rule would not match it)")
    return problems


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "facepipe_metrics_problems": metrics_problems,
            "facepipe_source_problems": source_problems,
        }
