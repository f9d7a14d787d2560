"""Loopback TCP ports for the services the library, the pipelines and the tests start locally.

Not here: binding or serving anything (a port found free may be taken before its user binds it; every
caller starts its server right away and reports a failed bind itself).
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port the OS reports free on `host` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int, host: str = LOOPBACK) -> int:
    """`preferred` when it is free (the addresses users expect), else any free port."""
    return preferred if port_free(preferred, host) else free_port(host)
