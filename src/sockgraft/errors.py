"""The one exception tree of sockgraft.

    SockgraftError                 base; every error the CLI reports cleanly
    +-- ConfigError                a user-supplied file/argument is invalid
    |                              (carries source, field, value)
    +-- KernelError                a kernel call failed (carries errno, op)
    |   +-- NotFound               the object is gone (ENOENT/ENODEV/ESRCH)
    |   |   +-- NotificationGone   a seccomp notification is no longer valid (its
    |   |                          target died or its syscall was interrupted):
    |   |                          the one case a trapped call goes unanswered
    |   +-- Exists                 the object already exists (EEXIST)
    +-- BpfUnavailable             the in-kernel graft programs cannot run here
    +-- LabError                   the lab is in a state that forbids the action
    +-- AgentError                 talking to / running the node agent failed
    +-- SockaddrError              a sockaddr the kernel would refuse (.errno: its answer)
    +-- CniError                   a CNI plugin error (.code: the CNI error code)
    +-- BenchParseError            a benchmark tool's output is not a success

OSError is translated into KernelError at the adapter boundary with
`from_oserror`, which branches on errno only, never on message text.
"""

from __future__ import annotations

import errno as _errno


class SockgraftError(Exception):
    """Base class of every sockgraft error."""


class ConfigError(SockgraftError):
    """Invalid user input: says where (source, field), what (value), and what is accepted."""

    def __init__(self, message: str, *, source: str | None = None,
                 field: str | None = None, value: object = None) -> None:
        self.source = source
        self.field = field
        self.value = value
        where = ""
        if source:
            where += f"{source}: "
        if field:
            where += f"{field}: "
        super().__init__(f"{where}{message}")


class KernelError(SockgraftError):
    def __init__(self, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        self.detail = detail
        name = _errno.errorcode.get(err, str(err))
        msg = f"{op} failed: {name} ({_errno_strerror(err)})"
        if detail:
            msg += f" [{detail}]"
        super().__init__(msg)


class NotFound(KernelError):
    pass


class NotificationGone(NotFound):
    pass


class Exists(KernelError):
    pass


class LabError(SockgraftError):
    pass


class AgentError(SockgraftError):
    pass


class BpfUnavailable(SockgraftError):
    """The machine cannot run the in-kernel graft programs (no clang, no libbpf,
    no cgroup v2, or the kernel refused them)."""


class SockaddrError(SockgraftError):
    """A sockaddr the kernel would refuse; `.errno` is what it would answer."""

    def __init__(self, errno: int, message: str) -> None:
        self.errno = errno
        super().__init__(f"{_errno.errorcode.get(errno, errno)}: {message}")


class CniError(SockgraftError):
    """A CNI plugin error: `code` is the CNI error code the runtime gets."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


class BenchParseError(SockgraftError):
    """A client's output is not what a successful run prints.

    `workload` names the workload, `reason` says what was missing or wrong,
    `tail` holds the last lines of the output (ANSI codes removed)."""

    def __init__(self, workload: str, reason: str, tail: str) -> None:
        self.workload = workload
        self.reason = reason
        self.tail = tail
        super().__init__(f"{workload}: {reason}; output ends with:\n{tail}")


def _errno_strerror(err: int) -> str:
    import os
    try:
        return os.strerror(err)
    except ValueError:
        return "unknown error"


_NOT_FOUND = {_errno.ENOENT, _errno.ENODEV, _errno.ESRCH}


def from_oserror(op: str, exc: OSError, detail: str = "") -> KernelError:
    """Translate an OSError (or pyroute2 NetlinkError, which has .code) into the tree."""
    err = getattr(exc, "errno", None) or getattr(exc, "code", None) or 0
    if err in _NOT_FOUND:
        return NotFound(op, err, detail)
    if err == _errno.EEXIST:
        return Exists(op, err, detail)
    return KernelError(op, err, detail)
