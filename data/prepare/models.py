"""The stages that run a model over a chunk's clips: aesthetic scoring and recaptioning.

Each is a class so Ray runs it as an actor that loads its model once (on a GPU when the
cluster has one) and then takes chunk after chunk; the inline runner calls it the same way.
Both use the clip's frames as the sample will be stored, so what is scored and described is
what is trained on.
"""

from __future__ import annotations

import io
import json

import av
import numpy as np
import torch
from PIL import Image

from data.decode import IMAGE_EXTS
from data.prepare.clips import dropped
from data.prepare.config import FilterConfig, RecaptionConfig

SCORE_SIZE = 224


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def clip_frames(clip: dict, count: int) -> list[Image.Image]:
    """`count` frames spread evenly over the clip (one for an image)."""
    if clip["ext"] in IMAGE_EXTS:
        return [Image.open(io.BytesIO(clip["media"])).convert("RGB")]
    frames = json.loads(clip["json"])["frames"]
    wanted = set(np.linspace(0, frames - 1, count).round().astype(int).tolist())
    picked = []
    with av.open(io.BytesIO(clip["media"])) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                picked.append(frame.to_image())
            if index >= max(wanted):
                break
    return picked


class AestheticScorer:
    """Scores each clip's middle frame with the user's model (a `torch.export` program) and
    drops the clips under `filter.min_aesthetic`."""

    def __init__(self, cfg: FilterConfig):
        self.model = torch.export.load(cfg.aesthetic_model).module().to(device())
        self.threshold = cfg.min_aesthetic

    @torch.inference_mode()
    def __call__(self, work: dict) -> dict:
        kept, rejected = [], []
        for clip in work["clips"]:
            frame = clip_frames(clip, 1)[0].resize((SCORE_SIZE, SCORE_SIZE), Image.BICUBIC)
            pixels = torch.from_numpy(np.array(frame)).permute(2, 0, 1)[None].float() / 255
            score = float(self.model(pixels.to(device())).reshape(-1)[0])
            meta = json.loads(clip["json"]) | {"aesthetic": round(score, 4)}
            if score < self.threshold:
                reason = f"filtered: aesthetic {score:.3g} < filter.min_aesthetic={self.threshold}"
                span = meta.get("clip_s") or (0.0, meta["duration"])
                rejected.append(dropped(clip, reason, tuple(span)))
            else:
                kept.append(clip | {"json": json.dumps(meta, sort_keys=True)})
        return work | {"clips": kept, "dropped": work["dropped"] + rejected}


class Recaptioner:
    """Describes each clip with a Hugging Face vision-language model (any class that
    `AutoModelForImageTextToText` loads), greedy and batched; the text lands in the sample's
    `recaption`, its original caption stays."""

    def __init__(self, cfg: RecaptionConfig):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg
        if cfg.dtype == "auto":
            dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
        else:
            dtype = getattr(torch, cfg.dtype)
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        self.processor.tokenizer.padding_side = "left"  # generation continues the prompt
        self.model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
        self.model.to(device()).eval()

    def prompt(self, images: int) -> str:
        content = [{"type": "image"}] * images + [{"type": "text", "text": self.cfg.prompt}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        return self.processor.image_token * images + self.cfg.prompt

    @torch.inference_mode()
    def describe(self, clips: list[dict]) -> list[str]:
        images = [clip_frames(clip, self.cfg.frames) for clip in clips]
        inputs = self.processor(
            images=images,
            text=[self.prompt(len(frames)) for frames in images],
            return_tensors="pt",
            padding=True,
        ).to(device(), dtype=self.model.dtype)
        tokens = self.model.generate(
            **inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False
        )
        new = tokens[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new, skip_special_tokens=True)]

    def __call__(self, work: dict) -> dict:
        clips = work["clips"]
        size = self.cfg.batch_size
        texts = [
            text for i in range(0, len(clips), size) for text in self.describe(clips[i : i + size])
        ]
        for clip, text in zip(clips, texts, strict=True):
            clip["json"] = json.dumps(
                json.loads(clip["json"]) | {"recaption": text}, sort_keys=True
            )
        return work
