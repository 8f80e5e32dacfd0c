"""Save the demo text encoder (MiniLM) in fp16 to a folder, for text_encoder.path.

It halves the 88 MB folder so that it travels to the GPU machine within the 64 MiB limit; the
GPU runs the encoder in half precision anyway.

    python -m bench.gpu.half_text_encoder .gpu_bundle/minilm_fp16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from model.text import default_text_encoder_path


def save_half(source: str, out: Path) -> None:
    model = transformers.AutoModel.from_pretrained(source, local_files_only=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    save_half(default_text_encoder_path(), args.out)
    print(f"fp16 text encoder in {args.out}")


if __name__ == "__main__":
    main()
