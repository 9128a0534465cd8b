"""A router joins its ports (SO_REUSEPORT) only as a router of its own application: a second server
left on the port, pdserve or not, is refused up front instead of silently sharing the clients."""
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pdserve.router.ingress import APP_PATH, IngressSettings, PortTaken, check_ports_are_ours


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(http_port: int, grpc_port: int, app_id: str = "ours") -> IngressSettings:
    return IngressSettings("127.0.0.1", http_port, grpc_port, 60.0, app_id)


@pytest.fixture
def http_server():
    """An HTTP server answering APP_PATH as a router of application "ours" does; anything else 404."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"app": "ours"}).encode() if self.path == APP_PATH else b"{}"
            self.send_response(200 if self.path == APP_PATH else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_free_ports_and_a_sibling_router_are_joined(http_server):
    check_ports_are_ours(settings(free_port(), free_port()))
    check_ports_are_ours(settings(http_server, free_port(), app_id="ours"))


def test_another_application_on_the_port_is_refused(http_server):
    with pytest.raises(PortTaken, match=f"Address already in use: port {http_server}"):
        check_ports_are_ours(settings(http_server, free_port(), app_id="theirs"))


def test_a_taken_grpc_port_beside_a_free_http_port_is_refused():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        grpc_port = listener.getsockname()[1]
        with pytest.raises(PortTaken, match=f"port {grpc_port}"):
            check_ports_are_ours(settings(free_port(), grpc_port))
