"Helpers shared by the test modules (pytest puts this folder on sys.path, so tests import them from `conftest`)."
import socket


def free_port() -> int:
    "A TCP port on 127.0.0.1 that is free right now (for servers and torch.distributed rendezvous started by a test)."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]
