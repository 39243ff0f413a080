"""Fail at once, in one line, when a server's port is taken: checked before any model loads."""

from __future__ import annotations

import errno
import socket

__all__ = ["check_port"]


def check_port(host: str, port: int, program: str, fix: str) -> None:
    """Raise ``SystemExit`` with one line naming the address and ``fix`` if ``host:port`` cannot be listened on.

    The probe sets ``SO_REUSEADDR`` as uvicorn does, so a port left in TIME_WAIT by a server that just stopped is
    not reported busy; a port with a listener is."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            reason = "in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
            raise SystemExit(f"{program}: cannot listen on {host}:{port} ({reason}); {fix}") from None
