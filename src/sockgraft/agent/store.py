"""The per-container graft configuration store: one TOML file per container
in a directory the operator (never a container) writes.

Edits are read-modify-write under an exclusive flock and land with an atomic
rename, so concurrent `sockgraft ep add` calls never lose each other's change
and the agent never reads half a file. Container marks (the SO_MARK id of each
container's grafted sockets) are kept here too, so they survive agent restarts
and sockets grafted before a restart stay under the same nftables chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from typing import Callable, Iterator

from ..errors import ConfigError
from ..model.graft import MARK_BASE
from ..model.graftconfig import GraftConfig, dump_config, load_config
from ..model.policy import Policy
from ..paths import state_dir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def default_dir() -> str:
    return os.path.join(state_dir(), "containers")


def empty_config(container: str) -> GraftConfig:
    return GraftConfig(container=container, endpoints={}, ingress=(), egress=(), policy=Policy())


class ConfigStore:
    def __init__(self, directory: str | None = None) -> None:
        self.dir = directory or default_dir()

    def _path(self, container: str) -> str:
        if not _NAME.match(container):
            raise ConfigError("container name: letters, digits, _ . + - (max 128), "
                              "starting with a letter or digit", field="container",
                              value=container)
        return os.path.join(self.dir, f"{container}.toml")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.dir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load(self, container: str) -> GraftConfig | None:
        path = self._path(container)
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        return load_config(text, path)

    def containers(self) -> list[str]:
        try:
            return sorted(f[:-5] for f in os.listdir(self.dir) if f.endswith(".toml"))
        except FileNotFoundError:
            return []

    def save(self, cfg: GraftConfig) -> None:
        with self._locked():
            self._write(cfg)

    def _write(self, cfg: GraftConfig) -> None:
        path = self._path(cfg.container)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(dump_config(cfg))
        os.replace(tmp, path)

    def edit(self, container: str, change: Callable[[GraftConfig], GraftConfig]) -> GraftConfig:
        """Apply a pure edit to a container's config atomically; returns the new config."""
        with self._locked():
            cfg = self.load(container) or empty_config(container)
            new = change(cfg)
            self._write(new)
            return new

    def delete(self, container: str) -> bool:
        with self._locked():
            try:
                os.unlink(self._path(container))
                return True
            except FileNotFoundError:
                return False

    def mark(self, container: str) -> int:
        """The container's stable SO_MARK (MARK_BASE | id, id in 1..65535)."""
        with self._locked():
            path = os.path.join(self.dir, "marks.json")
            try:
                with open(path) as f:
                    marks = json.load(f)
                if not isinstance(marks, dict):
                    raise ValueError("not an object")
            except FileNotFoundError:
                marks = {}
            except ValueError as exc:
                raise ConfigError(f"corrupt mark registry: {exc}", source=path) from exc
            if container not in marks:
                used = set(marks.values())
                free = next((i for i in range(1, 0x10000) if i not in used), None)
                if free is None:
                    raise ConfigError("no free container mark (65535 in use)", source=path)
                marks[container] = free
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(marks, f)
                os.replace(tmp, path)
            return MARK_BASE | marks[container]
