"""The private torch APIs behind train/torch_private.py: present in the installed torch, and a
clear error naming the API when one goes missing."""

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.device_mesh import DeviceMesh

from train import torch_private
from train.torch_private import TorchPrivateAPIError, lerp_all_


def test_every_private_api_exists_in_the_installed_torch():
    assert callable(DeviceMesh._flatten)
    assert callable(FileSystemReader._get_metadata_path)
    assert callable(torch_private._private_import("torch.distributed._composable", "checkpoint"))
    module, name = next(iter(torch_private.DCP_METADATA_GLOBALS))
    assert callable(torch_private._private_import(module, name))


def test_lerp_all_moves_each_target_towards_its_source():
    targets, sources = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.zeros(2)]
    lerp_all_(targets, sources, 0.25)
    torch.testing.assert_close(targets, [torch.full((3,), 0.25), torch.full((2,), 0.75)])


def test_a_missing_private_api_names_itself_and_the_checked_version():
    with pytest.raises(TorchPrivateAPIError, match=r"DeviceMesh\._flatten is missing .* 2\.13\.0"):
        torch_private.flatten_mesh(object(), "dp_shard_sp")
    with pytest.raises(TorchPrivateAPIError, match="torch.distributed._gone is missing"):
        torch_private._private_import("torch.distributed._gone", "checkpoint")


def test_no_agent_store_outside_torchelastic(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert torch_private.torchelastic_agent_store() is None
