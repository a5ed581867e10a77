"""Lab state files: what `lab up` created, so `lab down` removes exactly that.

One JSON file per lab under the state directory (/run/sockgraft/labs, or
$SOCKGRAFT_STATE_DIR/labs). It is written *before* the first kernel object is
created (status "creating") so that even a killed `up` can be torn down.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import ConfigError
from ..model.topology import LabPlan, parse_topology
from .. import paths


def state_dir() -> str:
    return os.path.join(paths.state_dir(), "labs")


def state_path(lab: str) -> str:
    return os.path.join(state_dir(), f"{lab}.json")


@dataclass
class LabState:
    name: str
    status: str            # "creating" | "up"
    source: str
    topology: str          # the topology text, so the plan can be rebuilt
    namespaces: list[str]

    def plan(self) -> LabPlan:
        return parse_topology(self.topology, self.source, name=self.name)


def write(state: LabState) -> None:
    os.makedirs(state_dir(), exist_ok=True)
    tmp = state_path(state.name) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state.__dict__, f, indent=1)
    os.replace(tmp, state_path(state.name))


def read(lab: str) -> LabState | None:
    try:
        with open(state_path(lab)) as f:
            raw = json.load(f)
        return LabState(**raw)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"corrupt lab state file: {exc}", source=state_path(lab)) from exc


def remove(lab: str) -> None:
    try:
        os.unlink(state_path(lab))
    except FileNotFoundError:
        pass


def list_labs() -> list[str]:
    try:
        return sorted(f[:-5] for f in os.listdir(state_dir()) if f.endswith(".json"))
    except FileNotFoundError:
        return []
