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


def check_name(container: object) -> str:
    """A container name the store takes (a file name, a key of the mark
    registry), or ConfigError."""
    if not isinstance(container, str) or not _NAME.fullmatch(container):
        raise ConfigError("container name: letters, digits, _ . + - (max 128), "
                          "starting with a letter or digit", field="container",
                          value=container)
    return container


def default_dir() -> str:
    return os.path.join(state_dir(), "containers")


def empty_config(container: str) -> GraftConfig:
    return GraftConfig(container=container, endpoints={}, ingress=(), egress=(), policy=Policy())


MARK_SPACE = 0xFFFF
RELEASED = ".released"      # ids given back (oldest first); names cannot start with "."
GENS = ".gen"               # {id: generation} of ids handed out again


def mark_space_from_env() -> int:
    """SOCKGRAFT_MARK_SPACE (1-65535): how many container marks exist. Only
    tests make it small, to churn through the whole space quickly."""
    raw = os.environ.get("SOCKGRAFT_MARK_SPACE", "")
    if not raw:
        return MARK_SPACE
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= MARK_SPACE:
        raise ConfigError(f"SOCKGRAFT_MARK_SPACE {raw!r}: expected 1-{MARK_SPACE}",
                          field="SOCKGRAFT_MARK_SPACE", value=raw)
    return n


class ConfigStore:
    def __init__(self, directory: str | None = None, mark_space: int | None = None) -> None:
        self.dir = directory or default_dir()
        self.mark_space = mark_space or mark_space_from_env()

    def _path(self, container: str) -> str:
        return os.path.join(self.dir, f"{check_name(container)}.toml")

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
        """Remove a container's configuration and give its mark back."""
        with self._locked():
            self._release(container)
            try:
                os.unlink(self._path(container))
                return True
            except FileNotFoundError:
                return False

    def release_unconfigured(self, container: str) -> bool:
        """The last session of a container the store holds no configuration
        for ended (an OCI or `sockgraft run` container: annotations, inline):
        give its mark back, as delete() does - else every container ever
        started keeps one, and after 65,535 no new one registers. (The next
        holder of the id gets the next generation: sockets still tagged for
        this one are refused everything.) True: released."""
        with self._locked():
            if os.path.exists(self._path(container)) or \
                    container not in self._read_marks():
                return False
            self._release(container)
            return True

    # --- container marks --------------------------------------------------------

    def _marks_path(self) -> str:
        return os.path.join(self.dir, "marks.json")

    def _read_marks(self) -> dict:
        path = self._marks_path()
        try:
            with open(path) as f:
                marks = json.load(f)
        except FileNotFoundError:
            return {RELEASED: [], GENS: {}}
        except ValueError as exc:
            raise ConfigError(f"corrupt mark registry: {exc}", source=path) from exc
        ok = isinstance(marks, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MARK_SPACE
            for k, v in marks.items() if k not in (RELEASED, GENS))
        released = marks.get(RELEASED, []) if ok else None
        gens = marks.get(GENS, {}) if ok else None
        if not ok or not isinstance(released, list) or not isinstance(gens, dict) or \
                not all(isinstance(i, int) for i in released) or \
                not all(isinstance(g, int) for g in gens.values()):
            raise ConfigError("corrupt mark registry: expected {name: id 1-65535, "
                              f"{RELEASED!r}: [id], {GENS!r}: {{id: gen}}}}", source=path)
        marks.setdefault(RELEASED, [])
        marks.setdefault(GENS, {})
        return marks

    def _write_marks(self, marks: dict) -> None:
        path = self._marks_path()
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(marks, f)
        os.replace(tmp, path)

    def _release(self, container: str) -> None:
        marks = self._read_marks()
        i = marks.pop(container, None)
        if i is not None:
            marks[RELEASED].append(i)
            self._write_marks(marks)

    def mark(self, container: str, in_use: Callable[[int], bool] | None = None) -> int:
        """The container's stable SO_MARK (MARK_BASE | id, id in 1..mark_space).

        A new container gets an id nobody held yet, else the oldest released
        one that `in_use` (the agent: a live session still carries it) says
        is free, in the next generation (`generation`): sockets tagged for its
        previous holder are refused everything from then on. Without
        `in_use`, released ids are not handed out again.

        A container that has its mark is answered from one read without the
        lock (the registry is replaced by rename, never written in place):
        the agent calls this on its loop, and only a new container's first
        mark waits for the lock, which every holder keeps for one short
        read-modify-write."""
        known = self._read_marks().get(check_name(container))
        if known is not None:
            return MARK_BASE | known
        with self._locked():
            marks = self._read_marks()
            if container in marks:
                return MARK_BASE | marks[container]
            held = {v for k, v in marks.items() if k not in (RELEASED, GENS)}
            released = marks[RELEASED]
            free = next((i for i in range(1, self.mark_space + 1)
                         if i not in held and i not in released), None)
            if free is None and in_use is not None:
                free = next((i for i in released if i not in held
                             and not in_use(MARK_BASE | i)), None)
                if free is not None:
                    released.remove(free)
                    gens = marks[GENS]
                    gens[str(free)] = (gens.get(str(free), 0) + 1) & 0xFFFF
            if free is None:
                raise ConfigError(f"no free container mark: {len(held)} of "
                                  f"{self.mark_space} held, {len(released)} released ones "
                                  "still in use", source=self._marks_path())
            marks[container] = free
            self._write_marks(marks)
            return MARK_BASE | free

    def marks(self) -> dict[str, int]:
        """{container: mark} of every container holding one (one unlocked read)."""
        return {k: MARK_BASE | v for k, v in self._read_marks().items()
                if k not in (RELEASED, GENS)}

    def generation(self, mark: int) -> int:
        """The current generation of a mark (0 until its id is handed out again)."""
        return int(self._read_marks()[GENS].get(str(mark & 0xFFFF), 0))

    def generations(self) -> dict[int, int]:
        """{mark: generation} of every mark ever handed out again."""
        return {MARK_BASE | int(i): int(g) for i, g in self._read_marks()[GENS].items()}
