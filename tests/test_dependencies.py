"""Dependencies as declared: deptry finds every import declared and every declaration used, and
the environment `make setup` made holds exactly the versions constraints.txt locks."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_import_is_declared_and_every_declaration_used():
    deptry = Path(sys.executable).parent / "deptry"
    result = subprocess.run([str(deptry), "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_environment_holds_the_locked_versions():
    locked = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split())
    installed = {}
    for name in locked:
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # locked for an extra this environment does not install
    different = {name: (locked[name], version) for name, version in installed.items()}
    different = {name: pair for name, pair in different.items() if pair[0] != pair[1]}
    assert not different, f"(locked, installed): {different}; `make lock` after an upgrade"
    assert len(installed) > len(locked) // 2  # the comparison covers the environment
