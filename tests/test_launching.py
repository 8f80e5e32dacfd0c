"""The helpers tests of runs share (tests/launching.py)."""

from __future__ import annotations

import pytest
from launching import metrics, random_seed, skip_unless_ci


def test_metrics_of_a_run_still_writing_leave_out_its_half_written_last_line(tmp_path):
    assert metrics(tmp_path) == []  # before the first step
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "tr')
    assert metrics(tmp_path) == [{"step": 1}, {"step": 2}]


def test_a_seed_is_replayed_from_the_environment(monkeypatch):
    monkeypatch.setenv("TESSERA_TEST_SEED", "123")
    assert random_seed() == 123


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_setup_fails_under_ci_and_skips_elsewhere(ci, outcome, monkeypatch):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no SLURM here"):
        skip_unless_ci("no SLURM here")
