"""The checkpoint's stores on their own, in one process: what each writes reads back, and a
checkpoint that would need unpickling code is refused."""

from __future__ import annotations

import fractions

import pytest
import torch

from train.checkpoint import Checkpointer, CheckpointError
from train.state import DCPStore, JsonStore, RandomState, RankStore


class Holder:
    """A component holding whatever state it is given."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def test_components_read_back_through_one_save_and_load(tmp_path):
    tensors, plain = Holder({"w": torch.arange(6.0), "lr": 0.5}), Holder({"step": 3})
    stores = [
        JsonStore("trainer.json", {"progress": plain}),
        DCPStore("dcp", {"weights": tensors}),
        RankStore("rng", RandomState()),
    ]
    checkpointer = Checkpointer(tmp_path, stores)
    saved = checkpointer.save(3)
    expected = torch.rand(4)
    tensors.state, plain.state = {"w": torch.zeros(6), "lr": 0.0}, {"step": 0}
    assert checkpointer.load_latest("auto") == saved
    assert plain.state == {"step": 3}
    assert torch.equal(tensors.state["w"], torch.arange(6.0)) and tensors.state["lr"] == 0.5
    assert torch.equal(torch.rand(4), expected)  # the generators are those of the save


def test_dcp_value_that_needs_unpickling_code_is_refused(tmp_path):
    # A Fraction is harmless, but rebuilding it runs a class the file names, as a malicious
    # pickle would: DCP alone reads it back; the store must refuse it.
    unsafe = Holder({"w": torch.ones(2), "extra": fractions.Fraction(1, 3)})
    DCPStore("dcp", {"x": unsafe}).stage(tmp_path, background=None)  # a blocking save
    template = Holder({"w": torch.zeros(2), "extra": 0})
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        DCPStore("dcp", {"x": template}).load(tmp_path)
    assert template.state["extra"] == 0
