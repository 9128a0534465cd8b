"""Which local address a KV channel binds: the route's source, an interface's address."""
import pytest

from pdserve.cluster.config import load_config
from pdserve.engine.transfer import make_receiver
from pdserve.engine.transfer.addresses import NoSuchInterface, address_toward, interface_address, interface_of

from kv_helpers import make_cache


def test_the_address_toward_a_peer_is_the_route_source():
    assert address_toward("127.0.0.1") == "127.0.0.1"


def test_an_interface_and_its_address_name_each_other():
    assert interface_address("lo") == "127.0.0.1"
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.77") is None  # an address no interface here holds


def test_an_unknown_interface_is_refused_naming_those_there_are():
    with pytest.raises(NoSuchInterface, match=r"no network interface 'pdsv-none'.*lo"):
        interface_address("pdsv-none")


def test_a_receiver_advertises_the_address_it_listens_on():
    receiver = make_receiver("gloo", make_cache(), host="127.0.0.1", timeout_s=5.0)
    try:
        assert receiver.address.host == "127.0.0.1" and receiver.address.port > 0
    finally:
        receiver.close()


def test_the_transfer_interface_is_a_config_key():
    assert load_config({"transfer": {"interface": "ens5"}}).transfer.interface == "ens5"
    assert load_config().transfer.interface is None
