"""Why a decode replica refuses a reservation: the cluster's shell maps each to the router's error."""
from __future__ import annotations


class QueueFull(RuntimeError):
    """This replica's waiting queue is full: refuse the request at once."""


class KvPoolFull(RuntimeError):
    """Not enough free KV blocks now: the request may wait for some within its deadline."""


class ReplicaDraining(RuntimeError):
    """This replica is leaving and takes no new requests."""


class ReplicaBroken(RuntimeError):
    """This replica cannot serve (its TP group broke) until it is replaced."""
