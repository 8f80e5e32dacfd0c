"""Save the demo text encoder (MiniLM) with fp16 weights to a folder, for text_encoder.path.

It halves the 88 MB folder so that it travels to the GPU machine within the 64 MiB limit. The
config still says float32, so it loads as the original does (fp32 embeddings, which the DiT
expects) with weights rounded to fp16.

    python -m bench.gpu.half_text_encoder .gpu_bundle/minilm_fp16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from model.text import default_text_encoder_path


def save_half(source: str, out: Path) -> None:
    model = transformers.AutoModel.from_pretrained(source, local_files_only=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "float32"  # the name transformers 5 reads, and 4's
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    save_half(default_text_encoder_path(), args.out)
    print(f"fp16 text encoder in {args.out}")


if __name__ == "__main__":
    main()
