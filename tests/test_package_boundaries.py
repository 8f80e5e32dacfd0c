"""The packages' boundaries, read from the source: what each may import, and the concepts that
have one owner (whether a batch holds stored latents; the checkpoint's file names)."""

from __future__ import annotations

import ast
from pathlib import Path

from train import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def importers(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """Files of `package` that import a module under one of `forbidden`, with what they import."""
    found = {}
    for path in sources(package):
        bad = sorted(m for m in imported(path) if m.split(".")[0] in forbidden or m in forbidden)
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_the_scan_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "lazy.py"
    module.write_text(
        "import os\n\ndef f():\n    from train.encode import run\n    import model.dit\n"
    )
    assert imported(module) == {"os", "train.encode", "model.dit"}


def test_data_imports_neither_train_nor_model():
    assert importers("data", ("train", "model")) == {}


def test_model_imports_neither_data_nor_train_nor_distribution():
    assert importers("model", ("data", "train", "torch.distributed")) == {}


def test_launch_starts_processes_without_importing_the_trainer():
    assert importers("launch", ("train",)) == {}


def test_one_module_asks_whether_a_batch_holds_stored_latents():
    asking = [p for p in sources("train") if "latents is not None" in p.read_text()]
    assert len(asking) <= 1, asking


def test_only_the_checkpoint_module_names_the_checkpoints_files():
    """train/checkpoint.py owns the layout: no other module of the trainer, launcher or
    benchmarks spells one of its file names."""
    names = {
        checkpoint.TRAINER,
        checkpoint.LR_SCHEDULE,
        checkpoint.MODEL,
        checkpoint.OPTIMIZER,
        checkpoint.EMA,
        checkpoint.MANIFEST,
    }
    spelled = {}
    for path in [*sources("train"), *sources("launch"), *sources("bench")]:
        if path == ROOT / "train" / "checkpoint.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
        if strings & names:
            spelled[str(path.relative_to(ROOT))] = sorted(strings & names)
    assert spelled == {}
