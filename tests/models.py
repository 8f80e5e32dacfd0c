"""Small models shared by tests."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from model.dit import DiT, dit_config
from train.encoders import FrozenEncoders
from train.latent_source import EncodingCache, OnlineLatents


def perturbed_tiny_dit(in_channels: int, text_dim: int, scale: float = 0.05) -> DiT:
    """The tiny DiT with every weight perturbed (seed 0): adaLN-Zero's closed branches open, so
    every input and every parameter matters."""
    torch.manual_seed(0)
    model = DiT(dit_config("tiny"), in_channels, text_dim)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def online_source(
    cfg, encoders: FrozenEncoders, cache: EncodingCache | None = None
) -> OnlineLatents:
    """The pixel shards' latent source of a composed config, on already built encoders."""
    return OnlineLatents(encoders, cfg.model.patch_size, cache)


# --- feature networks of the quality metrics (train/quality.py), random and tiny ---------

FEATURES = 8  # the tiny networks' feature dimension


class TinyI3D(nn.Module):
    """StyleGAN-V's i3d_torchscript.pt call signature, random weights, 8 features. It refuses
    input other than what the real one gets from VideoFeatures: 224x224 floats in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, kernel_size=(1, 8, 8), stride=(1, 8, 8))
        self.conv2 = nn.Conv3d(8, 16, kernel_size=3, stride=(1, 2, 2))
        self.head = nn.Linear(16, FEATURES)

    def forward(
        self, x: Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ) -> Tensor:
        if rescale or resize or x.shape[1] != 3 or x.shape[-2:] != (224, 224):
            raise ValueError("expected (N, 3, T, 224, 224) with rescale=False, resize=False")
        if x.min() < -1 or x.max() > 1:
            raise ValueError("expected pixels in [-1, 1]")
        logits = self.head(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3, 4)))
        return logits if return_features else logits.softmax(-1)


def save_tiny_i3d(path: Path) -> Path:
    """TinyI3D (seed 0) as a TorchScript file, as StyleGAN-V publishes the real detector."""
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyI3D().eval()), str(path))
    return path


CLIP_WORDS = "<pad> <unk> <bos> <eos> a red blue ball square rolls moves left right".split()


def save_tiny_clip(folder: Path) -> Path:
    """A tiny random CLIPModel with a word-level tokenizer and a CLIP image processor config,
    saved in `folder` as transformers saves a real one."""
    vocab = {word: i for i, word in enumerate(CLIP_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    ).save_pretrained(folder)
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(CLIP_WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,  # the text embedding is read at the first <eos>
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.25, 0.3],
    ).save_pretrained(folder)
    return folder
