"""Pretrained Wan video transformers (Wan 2.1 T2V, Wan 2.2 TI2V) as Tessera velocity models.

`WanVideoModel` composes diffusers' own `WanTransformer3DModel` instead of copying it: the weights
of a Wan-AI `-Diffusers` folder load without renaming, a result saves back in the same layout, and
numerics are diffusers' by construction. The wrapper only translates the trainer's call
`model(x, t, text, text_mask, given=...)` into Wan's:

- Flow convention: Wan and Tessera agree (x_t = (1 - t) x0 + t noise, the model predicts
  noise - x0); Wan reads the time on its 0..1000 step scale, so t is multiplied by 1000.
- Captions: Wan's pipelines feed the text encoder's states with padding positions zeroed and no
  mask; the wrapper does the same with the mask it is given.
- Given frames: Wan 2.2 TI2V takes one time per token, and its image-to-video pipeline sets the
  tokens of the given first frame to time 0 and keeps them clean, which is exactly Tessera's frame
  conditioning; so TI2V takes any `given` frames. Wan 2.1 T2V has one time per sample and refuses
  given frames.
- Micro-conditions (fps, native size) are accepted and ignored: Wan was not trained with them.

`blocks` exposes the transformer's blocks, so FSDP2 per block, activation checkpointing and
compile apply to it as to Tessera's DiT. LoRA adapters go in through peft (diffusers'
`add_adapter`), and export in diffusers' LoRA format, or merged into full weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from model.geometry import token_grid

WAN_VARIANTS = ("t2v", "ti2v")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
TIME_SCALE = 1000.0  # Wan's timestep for flow time t is 1000 t


@dataclass
class WanConfig:
    """Where a pretrained Wan transformer comes from, and what it must be. The geometry (depth,
    width, heads, patch) is the model config's own; these are the sizes it does not have."""

    path: str | None = None  # local diffusers folder: a pipeline (with transformer/) or its own
    variant: str = "t2v"  # t2v: one time per sample (Wan 2.1) | ti2v: per-token times (Wan 2.2)
    in_channels: int = 16  # latent channels of the Wan autoencoder it was trained with
    text_dim: int = 4096  # umT5-XXL hidden size
    ffn_dim: int = 8960


class WanFolderError(ValueError):
    """A Wan folder is missing a file or holds another model; the message names the file."""


def _diffusers():
    try:
        import diffusers
    except ImportError as error:
        raise ImportError("Wan models need diffusers: pip install 'diffusers>=0.35'") from error
    return diffusers


def transformer_folder(path: str | os.PathLike) -> Path:
    """The folder holding the transformer's config.json: `path` itself or `path/transformer`."""
    root = Path(path)
    if not root.is_dir():
        raise WanFolderError(f"Wan model folder not found: {root} (model.wan.path)")
    for folder in (root, root / "transformer"):
        if (folder / "config.json").is_file():
            return folder
    raise WanFolderError(
        f"no Wan transformer in {root}: neither {root / 'config.json'} nor "
        f"{root / 'transformer' / 'config.json'} exists"
    )


def expected_config(geometry, wan: WanConfig) -> dict:
    """The diffusers config values a folder must hold for this preset."""
    return {
        "num_layers": geometry.depth,
        "num_attention_heads": geometry.num_heads,
        "attention_head_dim": geometry.width // geometry.num_heads,
        "ffn_dim": wan.ffn_dim,
        "in_channels": wan.in_channels,
        "out_channels": wan.in_channels,
        "text_dim": wan.text_dim,
        "patch_size": list(geometry.patch_size),
    }


def check_folder(folder: Path, expected: dict) -> dict:
    """Read folder/config.json, check it against `expected` and that every weight file it needs
    is there; returns the config."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise WanFolderError(f"cannot read {config_file}: {error}") from error
    if config.get("_class_name") != "WanTransformer3DModel":
        raise WanFolderError(
            f"{config_file} is the config of a {config.get('_class_name')!r}, not of a "
            "WanTransformer3DModel"
        )
    wrong = {
        key: (config.get(key), value)
        for key, value in expected.items()
        if (list(config[key]) if isinstance(config.get(key), list) else config.get(key)) != value
    }
    if wrong:
        details = ", ".join(
            f"{k}={got} (the preset has {want})" for k, (got, want) in wrong.items()
        )
        raise WanFolderError(f"{config_file} is another model than the preset: {details}")
    for shard in _weight_files(folder):
        if not shard.is_file():
            raise WanFolderError(f"Wan weight file {shard} is missing")
    return config


def _weight_files(folder: Path) -> list[Path]:
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise WanFolderError(f"cannot read the shard index {index}: {error}") from error
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / WEIGHTS_NAME]


class WanVideoModel(nn.Module):
    """A diffusers `WanTransformer3DModel` behind the trainer's velocity-model call."""

    def __init__(self, transformer: nn.Module, geometry, variant: str):
        super().__init__()
        if variant not in WAN_VARIANTS:
            raise ValueError(
                f"model.wan.variant={variant!r} is not one of {', '.join(WAN_VARIANTS)}"
            )
        if variant == "ti2v" and geometry.patch_size[0] != 1:
            raise ValueError("model.wan.variant=ti2v needs a temporal patch size of 1")
        self.transformer = transformer
        self.cfg = geometry  # patch_size and the sizes, as Tessera's DiT has them
        self.variant = variant
        self.in_channels: int = transformer.config.in_channels
        self.text_dim: int = transformer.config.text_dim

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    def timesteps(self, t: Tensor, grid: tuple[int, int, int], given: Tensor | None) -> Tensor:
        """Wan's timestep: (B,) for T2V; (B, tokens) for TI2V, each token its frame's time."""
        if self.variant == "t2v":
            if given is not None and bool(given.any()):
                raise ValueError(
                    "Wan 2.1 T2V has one time per sample and cannot keep given frames clean: "
                    "train it with conditioning=t2v, or use a TI2V model for image-to-video"
                )
            if t.ndim == 2:  # per-frame times of a sample without given frames are all equal
                t = t[:, 0]
            return t * TIME_SCALE
        frames, height, width = grid
        per_frame = t[:, None].expand(-1, frames) if t.ndim == 1 else t
        return (per_frame[:, :, None] * TIME_SCALE).expand(-1, -1, height * width).flatten(1)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor,
        given: Tensor | None = None,
        fps: Tensor | None = None,
        native_size: Tensor | None = None,
    ) -> Tensor:
        """Velocity (B, C, T, H, W), the call of model/dit.py's DiT (fps, native_size unused)."""
        grid = token_grid(x.shape[2:], self.cfg.patch_size)
        context = text * text_mask[..., None].to(text.dtype)
        return self.transformer(
            hidden_states=x,
            timestep=self.timesteps(t, grid, given),
            encoder_hidden_states=context,
            return_dict=False,
        )[0]


def load_wan(geometry, wan: WanConfig) -> WanVideoModel:
    """The Wan transformer of `wan.path`, checked against the preset, in fp32."""
    if not wan.path:
        raise WanFolderError("model.wan.path is not set: point it at a local Wan diffusers folder")
    folder = transformer_folder(wan.path)
    check_folder(folder, expected_config(geometry, wan))
    model_class = _diffusers().WanTransformer3DModel
    try:
        transformer = model_class.from_pretrained(
            folder, local_files_only=True, torch_dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise WanFolderError(f"cannot load the Wan transformer in {folder}: {error}") from error
    return WanVideoModel(transformer, geometry, wan.variant)


def save_wan(model: WanVideoModel, folder: str | os.PathLike, max_shard_size: str = "5GB") -> Path:
    """The transformer in diffusers' layout (config.json + safetensors shards)."""
    model.transformer.save_pretrained(
        folder, safe_serialization=True, max_shard_size=max_shard_size
    )
    return Path(folder)


# ------------------------------------------------------------------------------------------------
# LoRA (peft, through diffusers' adapter methods)
# ------------------------------------------------------------------------------------------------


def add_lora(model: WanVideoModel, rank: int, alpha: float, target_modules: list[str]) -> None:
    """Add a LoRA adapter to the transformer's `target_modules` and freeze everything else.
    peft starts lora_B at zero, so the model's output is unchanged until the adapter trains."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True
    )
    model.requires_grad_(False)
    try:
        model.transformer.add_adapter(config)
    except ValueError as error:
        raise ValueError(f"lora.target_modules={list(target_modules)}: {error}") from error
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)


def lora_config(model: WanVideoModel) -> dict:
    """The adapter's peft config, as diffusers stores it beside LoRA weights."""
    values = model.transformer.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in values.items()}


def adapter_weights(model: WanVideoModel) -> dict[str, Tensor]:
    """The adapter's tensors under diffusers' LoRA names (blocks.0.attn1.to_q.lora_A.weight)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model.transformer, adapter_name="default")


def save_lora(model: WanVideoModel, folder: str | os.PathLike) -> Path:
    """The adapter in diffusers' LoRA format: `pytorch_lora_weights.safetensors` with
    `transformer.`-prefixed keys and the adapter's config, which `WanPipeline.load_lora_weights`
    reads."""
    pipeline_class = _diffusers().WanPipeline
    pipeline_class.save_lora_weights(
        folder,
        transformer_lora_layers={k: v.contiguous() for k, v in adapter_weights(model).items()},
        transformer_lora_adapter_metadata=lora_config(model),
    )
    return Path(folder)


def merge_lora(model: WanVideoModel) -> None:
    """Fold the adapter into the base weights (W + alpha/r B A) and remove it, in place."""
    model.transformer.fuse_lora(lora_scale=1.0)
    model.transformer.unload_lora()
