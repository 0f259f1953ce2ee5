"""The hub probe: offline at once by environment, bounded in time, TLS-verified."""
import time

import models.hub as hub


def test_offline_env_answers_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert hub.hub_reachable() is False
    assert time.perf_counter() - start < 0.1


def test_hub_probe_is_bounded(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def stuck(*args, **kwargs):  # a resolver or connect that never answers
        time.sleep(30)
        raise OSError("never answered")

    monkeypatch.setattr(hub.socket, "create_connection", stuck)
    start = time.perf_counter()
    assert hub.probe_hub(timeout=0.3) is False
    assert time.perf_counter() - start < 2.0


def test_hub_probe_needs_a_real_tls_peer(monkeypatch):
    """A port that accepts TCP but is not huggingface.co (as in sandboxes) is not "online"."""
    import socket
    import threading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def accept_and_close():
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    monkeypatch.setattr(hub, "HUB_HOST", ("127.0.0.1", server.getsockname()[1]))
    try:
        assert hub.probe_hub(timeout=2.0) is False
    finally:
        server.close()
