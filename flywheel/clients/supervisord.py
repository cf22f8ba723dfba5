"""supervisord's XML-RPC interface, over its unix socket in the state folder."""

from __future__ import annotations

import xmlrpc.client
from pathlib import Path


def connect(socket: Path):
    """The `supervisor` namespace of supervisord's XML-RPC API (getAllProcessInfo, addProcessGroup, ...)."""
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, f"unix://{socket}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def running(socket: Path) -> bool:
    try:
        return connect(socket).getState()["statename"] == "RUNNING"
    except (OSError, xmlrpc.client.Fault):
        return False
