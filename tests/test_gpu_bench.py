"""The one-shot GPU bench (bench/gpu) in its --smoke mode on the CPU, so that the script the next
GPU session runs cannot rot: same code, tiny sizes, seconds."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from launching import ROOT, process_env

from bench.gpu.mfu import CHANNELS, TEXT_DIM, TEXT_LEN, latent_shape, run_bench, text_table
from model.dit import DiT, dit_config
from model.flops import dit_train_flops
from train.compile import compile_blocks


@pytest.fixture(scope="module")
def report() -> dict:
    return run_bench(smoke=True, budget_s=120)


def test_smoke_report_has_positive_figures_consistent_with_the_flop_count(report):
    assert report["device"] == "cpu" and report["matmul"]["tflops"] > 0
    measured = [case for case in report["cases"] if case["status"] == "ok"]
    assert [case["checkpointing"] for case in measured] == [False, True]
    for case in measured:
        flops = dit_train_flops(
            dit_config(case["size"]), CHANNELS, TEXT_DIM, case["tokens"], TEXT_LEN
        )
        seconds = case["seconds_per_step"]
        assert case["flops_per_step"] == flops > 0 and seconds > 0
        assert math.isclose(case["tokens_per_s"], case["tokens"] / seconds)
        assert math.isclose(case["tflops"] * 1e12, flops / seconds)
        ceiling = report["matmul"]["tflops"] * 1e12
        assert math.isclose(case["mfu_ceiling"], flops / seconds / ceiling)
        assert case["mfu_datasheet"] is None  # no datasheet peak for a CPU
        assert case["peak_memory_gib"] is None


def test_compiled_case_on_cpu_is_refused_with_the_reason(report):
    (compiled,) = [case for case in report["cases"] if case["compile"]]
    assert compiled["status"] == "refused"
    assert "refused on CPU" in compiled["reason"] and "bench/compile.py" in compiled["reason"]


def test_profile_names_the_sdpa_kernel_and_its_share(report):
    attention = report["attention"]
    assert attention["sdpa_backends"] == ["flash (cpu)"]
    assert 0 < attention["attention_share"] < 1
    kernels = attention["top_kernels"]
    assert 0 < len(kernels) <= 10 and all(k["ms"] > 0 for k in kernels)
    assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
    table = text_table(report)
    assert all(case["case"] in table for case in report["cases"])


def test_latent_shape_gives_exactly_the_tokens_or_names_the_problem():
    assert latent_shape(16384, [1, 2, 2]) == (16, 64, 64)
    assert latent_shape(65536, [1, 2, 2]) == (16, 128, 128)
    with pytest.raises(ValueError, match="not 16 frames of a square grid"):
        latent_shape(20000, [1, 2, 2])


def test_compile_blocks_refuses_a_cpu_model():
    model = DiT(dit_config("pico"), 4, 8)
    with pytest.raises(ValueError, match="refused on CPU"):
        compile_blocks(model.blocks, torch.device("cpu"))


def test_model_and_bench_import_without_what_the_gpu_image_lacks():
    blocked = ["av", "decord", "hydra", "omegaconf", "webdataset", "wandb", "deepspeed", "botocore"]
    script = f"""
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not on the GPU image")
sys.meta_path.insert(0, Missing())
import model.dit, model.flops, model.attention, model.autoencoder, model.text, model.flow, model.pretrained, model.conditioning
import bench.gpu.mfu, bench.gpu.trainer_check, bench.gpu.half_text_encoder, bench.gpu.latent_check
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=process_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
