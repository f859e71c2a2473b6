"""Quick acks (itwinai_sync/targets/quickack.py): which servers get them, for how long, and that
they reach a TLS connection too. The sync into a real multi-worker `mlflow server` is tested in
test_mlflow_export.py."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading

import pytest
import requests

from itwinai_sync.targets import quickack

pytestmark = pytest.mark.skipif(quickack._QUICKACK is None, reason="TCP_QUICKACK is Linux's")


@pytest.fixture
def servers(monkeypatch):
    """A registry of its own, so that nothing leaks between tests."""
    fresh = type(quickack._servers)()
    monkeypatch.setattr(quickack, "_servers", fresh)
    return fresh


def test_quick_acks_are_for_http_servers_while_a_sync_to_them_runs(servers, monkeypatch):
    """An http(s) server gets them (however its host is spelt) as long as any sync to it
    runs; never a local store; none with ITWINAI_SYNC_QUICKACK=0."""
    assert not quickack.acknowledge_at_once("sqlite:///x/mlflow.db")
    assert not quickack.acknowledge_at_once("file:///x/mlruns")
    monkeypatch.setenv(quickack.ENV, "0")
    assert not quickack.acknowledge_at_once("http://127.0.0.1:5000")
    assert servers == {}
    monkeypatch.delenv(quickack.ENV)
    assert quickack.acknowledge_at_once("http://127.0.0.1:5000")
    assert quickack.acknowledge_at_once("HTTP://LocalHost.:5000/prefix")
    assert quickack.acknowledge_at_once("http://127.0.0.1:5000/")
    assert quickack.acknowledge_at_once("https://[::1]")
    assert servers == {("127.0.0.1", 5000): 2, ("localhost", 5000): 1, ("::1", 443): 1}
    for uri in ("http://127.0.0.1:5000", "http://localhost:5000", "https://[::1]:443"):
        quickack.release(uri)
    assert servers == {("127.0.0.1", 5000): 1}
    quickack.release("http://127.0.0.1:5000")
    quickack.release("http://127.0.0.1:5000")  # one more than taken: nothing to release
    assert servers == {}


def _self_signed(tmp_path):
    """A certificate and key for 127.0.0.1 (cryptography comes with MLflow)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a tracking server

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_a_tls_connection_is_acknowledged_at_once_too(servers, tmp_path, quickacked):
    certfile, keyfile = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    uri = f"https://127.0.0.1:{port}"
    try:
        with requests.Session() as session:
            assert quickack.acknowledge_at_once(uri)
            for _ in range(3):
                assert session.get(uri, verify=str(certfile)).content == b"{}"
            assert quickacked == [port] * 3
            quickack.release(uri)
            assert session.get(uri, verify=str(certfile)).content == b"{}"
            assert quickacked == [port] * 3
    finally:
        httpd.shutdown()
        httpd.server_close()
