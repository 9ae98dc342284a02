"""Every module imports alone, first in a fresh interpreter: an import cycle shows only
in the order that meets it (``engine.customdata`` first once failed on its own import
of ``engine.hooks``, where a pydantic default called back into it), and the tests
import modules in one order only."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(
    f"{package}.{path.stem}" for package in ("engine", "engine.transports", "actors", "bench")
    for path in (ROOT / package.replace(".", "/")).glob("*.py") if path.stem != "__init__")


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    assert "engine.customdata" in MODULES and "engine.transports.kafka" in MODULES

    def imported(module: str) -> tuple[str, int, str]:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        return module, done.returncode, done.stderr[-600:]

    with ThreadPoolExecutor(4) as pool:
        failed = [(m, err) for m, code, err in pool.map(imported, MODULES) if code]
    assert failed == []
