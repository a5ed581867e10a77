"""Where sockgraft keeps its runtime state on a node."""

from __future__ import annotations

import os

DEFAULT_STATE_DIR = "/run/sockgraft"


def state_dir() -> str:
    """The node's state directory: agent and OCI sockets, labs, the config
    store, the embedded directory, CNI registrations. $SOCKGRAFT_STATE_DIR
    overrides it (tests and several labs side by side)."""
    return os.environ.get("SOCKGRAFT_STATE_DIR", DEFAULT_STATE_DIR)
