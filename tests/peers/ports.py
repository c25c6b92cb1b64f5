"""Loopback ports for test peers.

The integration tests start real daemons (Dovecot, Postfix, ...) that must listen on a
TCP port nobody else uses. :func:`free_port` asks the kernel for an unused port on
127.0.0.1 by binding port 0 and closing the socket again; the daemon then binds it. That
leaves a short window in which another process could take the port, so callers that start
a daemon on it retry with a new port when the daemon reports "Address already in use".
Ports handed out by this process are remembered so that two fixtures in one test run
never receive the same number, even when the kernel would reuse it.

:func:`wait_port` polls until something accepts connections on a port (a daemon that
forks its listener after starting is ready only then).
"""

from __future__ import annotations

import socket
import time

__all__ = ["free_port", "port_is_open", "wait_port"]

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is unused right now and not handed out before."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("the kernel keeps returning ports this test run already used")


def port_is_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Tell whether a TCP connection to ``host:port`` is accepted right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 5.0) -> None:
    """Wait until ``host:port`` accepts TCP connections; raise ``TimeoutError`` if not."""
    deadline = time.monotonic() + timeout
    while True:
        if port_is_open(host, port, timeout=min(0.5, timeout)):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing accepted connections on {host}:{port} in {timeout}s")
        time.sleep(0.01)
