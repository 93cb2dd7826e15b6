"""Free TCP ports on loopback for test servers."""

import socket


def free_port() -> int:
    """A port nothing listens on right now (the kernel's choice of an ephemeral port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
