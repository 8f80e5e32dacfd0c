"""Pretrained Wan models (model/pretrained.py, train/pretrained.py) against diffusers' own classes, on tiny
random Wan models saved with `save_pretrained` (nothing is downloaded):

- the loaded model gives diffusers' velocity (Wan 2.1 T2V and 2.2 TI2V, fp32 CPU, 1e-6 relative),
  and saving it back loads in diffusers with identical tensors;
- a wrong or partial folder fails naming the file;
- LoRA: only the adapters change while training, bitwise; the diffusers-format export loads into
  diffusers' WanPipeline and changes its output; the merged export is base + adapter;
- the memory arithmetic (bench/pretrained_memory.py) counts the parameters diffusers and peft
  make.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from wan_models import TINY_WAN, save_tiny_pipeline, tiny_transformer, wan_overrides

from model.pretrained import (
    FAMILIES,
    PretrainedConfig,
    PretrainedFolderError,
    PretrainedVideoModel,
    add_lora,
    load_pretrained,
    save_lora,
    save_pretrained,
)
from train.config import ModelConfig, OptimConfig, register_configs, to_config
from train.pretrained import export_pretrained

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def geometry(
    family: str = "wan2.1", path: Path | None = None
) -> tuple[ModelConfig, PretrainedConfig]:
    wan = PretrainedConfig(
        family=family,
        path=str(path),
        text_dim=TINY_WAN["text_dim"],
        config={"ffn_dim": TINY_WAN["ffn_dim"]},
    )
    heads, head_dim = TINY_WAN["num_attention_heads"], TINY_WAN["attention_head_dim"]
    return ModelConfig(depth=2, width=heads * head_dim, num_heads=heads, pretrained=wan), wan


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny Wan transformer in its own folder (config.json + safetensors)."""
    path = tmp_path_factory.mktemp("wan") / "transformer"
    tiny_transformer().save_pretrained(path)
    return path


def inputs(seed: int = 1, frames: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, frames, 4, 6, generator=generator)
    t = torch.rand(2, generator=generator)
    text = torch.randn(2, 7, TINY_WAN["text_dim"], generator=generator)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    return x, t, text, mask


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_wan21_t2v_gives_the_velocity_of_diffusers(folder):
    model = load_pretrained(*geometry("wan2.1", folder))
    reference = WanTransformer3DModel.from_pretrained(folder).eval()
    x, t, text, mask = inputs()
    ours = model(x, t, text, mask)
    # What WanPipeline feeds: padding states zeroed, the step on the 0..1000 scale.
    theirs = reference(x, t * 1000, text * mask[..., None], return_dict=False)[0]
    print(f"\nWan 2.1 T2V: max relative difference {relative(ours, theirs):.3g}")
    assert relative(ours, theirs) <= 1e-6 and theirs.abs().max() > 0.1
    # Per-frame times without given frames (how the trainer calls it) are the same call.
    frames = torch.zeros(2, 3, dtype=torch.bool)
    assert torch.equal(model(x, t[:, None].expand(2, 3), text, mask, given=frames), ours)
    with pytest.raises(ValueError, match="family=wan2.1 has one time per sample"):
        model(x, t, text, mask, given=frames | torch.tensor([True, False, False]))


@torch.no_grad()
def test_wan22_ti2v_gives_the_per_token_velocity_of_diffusers(folder):
    model = load_pretrained(*geometry("wan2.2_ti2v", folder))
    reference = WanTransformer3DModel.from_pretrained(folder).eval()
    x, t, text, mask = inputs()
    given = torch.tensor([[True, False, False], [False, False, False]])
    per_frame = t[:, None].expand(2, 3).masked_fill(given, 0.0)
    ours = model(x, per_frame, text, mask, given=given)
    # Wan 2.2's image-to-video pipeline: one step per token, 0 on the given first frame.
    tokens_per_frame = (4 // 2) * (6 // 2)
    timestep = (per_frame * 1000).repeat_interleave(tokens_per_frame, dim=1)
    theirs = reference(x, timestep, text * mask[..., None], return_dict=False)[0]
    print(f"\nWan 2.2 TI2V: max relative difference {relative(ours, theirs):.3g}")
    assert relative(ours, theirs) <= 1e-6
    # The given frame's time matters: it is not the T2V call.
    assert relative(model(x, t, text, mask), theirs) > 1e-3


def test_saving_back_loads_in_diffusers_with_identical_tensors(folder, tmp_path):
    model = load_pretrained(*geometry("wan2.1", folder))
    assert save_pretrained(model, tmp_path / "saved") == [tmp_path / "saved" / "transformer"]
    reloaded = WanTransformer3DModel.from_pretrained(tmp_path / "saved" / "transformer")
    reloaded = reloaded.state_dict()
    original = WanTransformer3DModel.from_pretrained(folder).state_dict()
    assert reloaded.keys() == original.keys()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)
    # Sharded: an index and several files, which load the same.
    save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded" / "transformer").glob("*.safetensors"))) > 1
    resharded = load_pretrained(*geometry("wan2.1", tmp_path / "sharded")).transformer.state_dict()
    assert all(torch.equal(resharded[k], original[k]) for k in original)


def test_a_wrong_or_partial_folder_fails_naming_the_file(folder, tmp_path):
    save_pretrained(load_pretrained(*geometry("wan2.1", folder)), tmp_path, max_shard_size="20KB")
    sharded = tmp_path / "transformer"
    missing = sorted(sharded.glob("*-of-*.safetensors"))[1]
    missing.unlink()
    with pytest.raises(PretrainedFolderError, match=f"weight file {missing} is missing"):
        load_pretrained(*geometry("wan2.1", sharded))

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_layers": 4}))
    with pytest.raises(
        PretrainedFolderError, match=f"{other / 'config.json'} is another model.*num_layers=4"
    ):
        load_pretrained(*geometry("wan2.1", other))
    (other / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(PretrainedFolderError, match="config of a 'UNet2DModel', not of the Wan"):
        load_pretrained(*geometry("wan2.1", other))
    (other / "config.json").unlink()
    with pytest.raises(PretrainedFolderError, match=f"none of {other / 'config.json'}"):
        load_pretrained(*geometry("wan2.1", other))
    (other / "config.json").write_text(json.dumps(config))
    (other / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PretrainedFolderError, match=f"cannot load the transformer in {other}"):
        load_pretrained(*geometry("wan2.1", other))


# --- LoRA -----------------------------------------------------------------------------------


def lora_model(folder: Path, rank: int = 4) -> PretrainedVideoModel:
    model = load_pretrained(*geometry("wan2.1", folder))
    torch.manual_seed(3)
    add_lora(model, rank, 2.0 * rank, ["to_q", "to_k", "to_v", "to_out.0"])
    return model


def train_adapter(model: PretrainedVideoModel, steps: int = 3) -> None:
    """A few optimiser steps through the trainer's engine on a flow-matching-like loss."""
    from train.config import ParallelConfig
    from train.parallel import ParallelDims, build_engine

    dims = ParallelDims.resolve(ParallelConfig(), 1)
    optim = OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1)
    engine = build_engine(model, ParallelConfig(), optim, dims, 1, steps)
    for step in range(steps):
        x, t, text, mask = inputs(seed=10 + step)
        engine.micro_step(model(x, t, text, mask).square().mean())
        engine.finish_step()


def test_lora_trains_only_the_adapters_and_leaves_the_base_bitwise(folder):
    model = lora_model(folder)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_adapter(model)
    after = dict(model.named_parameters())
    base = [n for n in before if n not in trainable]
    assert all(torch.equal(after[n], before[n]) for n in base)
    changed = [n for n in trainable if not torch.equal(after[n], before[n])]
    assert changed == trainable, "every adapter tensor should have moved"


def pipeline_video(pipe: WanPipeline) -> torch.Tensor:
    return pipe(
        prompt="a rabbit",
        negative_prompt="",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames


def test_exported_lora_loads_in_the_wan_pipeline_and_merges_to_base_plus_adapter(tmp_path):
    pipeline_folder = save_tiny_pipeline(tmp_path / "pipeline")
    transformer_folder = pipeline_folder / "transformer"
    model = lora_model(transformer_folder)
    train_adapter(model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_lora(model, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    pipe = WanPipeline.from_pretrained(pipeline_folder)
    plain = pipeline_video(pipe)
    pipe.load_lora_weights(tmp_path / "lora")
    adapted = pipeline_video(pipe)
    print(f"\nLoRA changes the pipeline's video by up to {(adapted - plain).abs().max():.3g}")
    assert (adapted - plain).abs().max() > 1e-3

    # The merged export: W + (alpha / r) B A for every adapted layer, the rest as loaded.
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        config = to_config(
            compose(
                "config",
                overrides=[
                    "experiment=wan_lora",
                    *wan_overrides(pipeline_folder),
                    "lora.rank=4",
                    "lora.alpha=8",
                    "lora.merge_on_export=true",
                ],
            )
        )
    copy = lora_model(transformer_folder)
    written = export_pretrained(config, copy, trained, tmp_path / "export")
    assert [p.name for p in written] == ["lora", "transformer"]
    merged = WanTransformer3DModel.from_pretrained(tmp_path / "export" / "transformer").state_dict()
    base = load_file(transformer_folder / "diffusion_pytorch_model.safetensors")
    adapter = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert merged.keys() == base.keys()
    worst = 0.0
    for name, weight in base.items():
        layer = "transformer." + name.removesuffix(".weight")
        if name.endswith(".weight") and f"{layer}.lora_A.weight" in adapter:
            down, up = adapter[f"{layer}.lora_A.weight"], adapter[f"{layer}.lora_B.weight"]
            expected = weight + (8 / 4) * up @ down
            worst = max(worst, relative(merged[name], expected))
            assert not torch.equal(merged[name], weight)
        else:
            assert torch.equal(merged[name], weight), name
    print(f"merged export vs base + adapter: max relative difference {worst:.3g}")
    assert worst <= 1e-6


def test_memory_arithmetic_counts_the_parameters_peft_and_diffusers_make():
    from bench.pretrained_memory import lora_param_count, meta_transformer

    tiny, wan = geometry("wan2.1", None)
    counted = sum(p.numel() for p in meta_transformer(tiny, wan).parameters())
    real = tiny_transformer()
    assert counted == sum(p.numel() for p in real.parameters())
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    adapters = lora_param_count(real, 4, targets)
    model = PretrainedVideoModel(FAMILIES["wan2.1"], [real], tiny, wan)
    add_lora(model, 4, 4.0, targets)
    assert adapters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_presets_compose_and_refuse_what_wan_21_cannot_do():
    def config(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            return to_config(compose("config", overrides=list(overrides)))

    for name, heads, family in [
        ("wan2.1_t2v_1.3b", 12, "wan2.1"),
        ("wan2.1_t2v_14b", 40, "wan2.1"),
        ("wan2.2_ti2v_5b", 24, "wan2.2_ti2v"),
        ("wan2.2_t2v_a14b", 40, "wan2.2_a14b"),
    ]:
        composed = config("experiment=wan_lora", f"model={name}", "model.pretrained.path=/data/wan")
        assert composed.model.num_heads == heads and composed.model.pretrained.family == family
        assert composed.autoencoder.pretrained_path == "/data/wan"
        assert composed.text_encoder.tokenizer_path == "/data/wan/tokenizer"
        assert composed.lora.rank == 32
    with pytest.raises(ValueError, match="family=wan2.1 has one time per sample .* given frames"):
        config("experiment=wan_finetune", "conditioning=mixed")
    with pytest.raises(ValueError, match="lora.rank > 0 needs a pretrained model"):
        config("lora.rank=4")
    with pytest.raises(Exception, match="rnak"):
        config("experiment=wan_lora", "lora.rnak=4")
