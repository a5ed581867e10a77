"""Small /proc lookups the agent makes about target processes."""

from __future__ import annotations

import os


def socket_open(pid: int, fd: int, inode: int) -> bool:
    """Does fd in process pid still hold that socket (and not a reused number)?"""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]"
    except OSError:
        return False


def tgid(tid: int) -> int:
    """The process (thread group) a thread id belongs to; tid itself if gone."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return tid
