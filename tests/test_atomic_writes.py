"""The one helper every whole-file write goes through (data/storage.py): a reader sees the old
file or the whole new one, and a write that fails leaves the old file and nothing else."""

from __future__ import annotations

import pytest

from data.storage import atomic_path, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError, match="halfway"), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        assert path.read_text() == "old"  # nothing visible under the name while writing
        raise RuntimeError("killed halfway")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


@pytest.mark.parametrize("durable", [False, True])
def test_a_whole_write_replaces_the_file(tmp_path, durable):
    path = tmp_path / "latest"
    write_atomic(path, b"step_00000001", durable=durable)
    write_atomic(path, "step_00000002", durable=durable)
    assert path.read_text() == "step_00000002"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
