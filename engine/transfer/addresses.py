"""Which local address a KV channel binds and advertises.

A receiver listens on the address its caller names (the node's address in a
cluster, loopback on one machine); a sender binds the address the kernel would
send from to reach that receiver, so each end tells its peer an address the peer
can reach. Left to itself gloo would pick the address the hostname resolves to,
often 127.0.0.1, which a peer on another host cannot reach.
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


class NoSuchInterface(ValueError):
    """The named network interface does not exist here or has no IPv4 address."""


def address_toward(peer_host: str) -> str:
    """The local address that packets to `peer_host` leave from (no packet is sent)."""
    family = socket.AF_INET6 if ":" in peer_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((peer_host, 9))  # a UDP connect only looks up the route
        return probe.getsockname()[0]


def interface_address(name: str) -> str:
    """The IPv4 address of the network interface `name` (e.g. the fast NIC of a multi-homed host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            known = ", ".join(sorted(n for _, n in socket.if_nameindex()))
            raise NoSuchInterface(f"no network interface {name!r} with an IPv4 address here (interfaces: {known})") from None
    return socket.inet_ntoa(packed[20:24])


def interface_of(address: str) -> str | None:
    """The name of the interface holding `address` (None when no interface has it)."""
    for _, name in socket.if_nameindex():
        try:
            if interface_address(name) == address:
                return name
        except NoSuchInterface:
            continue
    return None


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"
