"""LTX-Video, Wan 2.2 A14B, HunyuanVideo and CogVideoX 1.5 through the one adapter for diffusers video transformers
(model/pretrained.py), against diffusers' own classes on tiny random models saved with
`save_pretrained` (Wan 2.1 and 2.2 TI2V: tests/test_wan.py):

- LTX-Video gives the velocity of its transformer called as LTXPipeline calls it (tokens, caption
  mask, rotary scale from the frame rate), and as its image-to-video pipeline does for a given
  first frame (time 0 on its tokens);
- Wan 2.2 A14B sends each sample to the expert of its noise level, on both sides of the
  boundary in one batch, and an expert without samples still takes part in the backward; the
  I2V A14B is shown a first image, or a first and a last, as WanImageToVideoPipeline shows them;
- HunyuanVideo's captions are its pipeline's encode_prompt (Llama states in the prompt template,
  CLIP's pooled vector as a summary token), and its velocity is its transformer called as
  HunyuanVideoPipeline calls it (pooled projections, embedded guidance);
- CogVideoX's v-prediction at its schedule's steps becomes the flow velocity (checked against
  the algebra with the true v, and against its transformer called as CogVideoXPipeline calls it:
  frames before channels, its rotary table);
- each saves back to tensors diffusers loads bitwise; a folder of another family or without an
  expert fails naming the file;
- LoRA (LTX-Video, HunyuanVideo, CogVideoX, A14B's low-noise expert) trains only its adapters,
  the base bitwise, and the export loads with the family pipeline's load_lora_weights and changes
  its video;
- every preset builds its family's transformer at the published size (on the meta device).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from family_models import (
    HUNYUAN_TEMPLATE_CROP,
    LTX_STRIDE,
    TEXT_DIM,
    TINY_COGVIDEOX,
    TINY_HUNYUAN,
    TINY_LTX,
    a14b_overrides,
    save_tiny_a14b,
    save_tiny_wan_i2v_a14b,
    tiny_cogvideox_pipeline,
    tiny_hunyuan_pipeline,
    tiny_ltx_pipeline,
)
from wan_models import TINY_WAN

from model.pretrained import (
    FAMILIES,
    PretrainedConfig,
    PretrainedFolderError,
    add_lora,
    load_pretrained,
    save_lora,
    save_pretrained,
)
from model.text import HunyuanVideoTextEncoder, TextEncoder, TextEncoderConfig
from train.config import ModelConfig


def ltx_geometry(path: Path) -> tuple[ModelConfig, PretrainedConfig]:
    ltx = PretrainedConfig(
        family="ltx_video",
        path=str(path),
        in_channels=TINY_LTX["in_channels"],
        text_dim=TEXT_DIM,
        config={"cross_attention_dim": TINY_LTX["cross_attention_dim"]},
        latent_stride=list(LTX_STRIDE),
    )
    heads, head_dim = TINY_LTX["num_attention_heads"], TINY_LTX["attention_head_dim"]
    geometry = ModelConfig(
        depth=TINY_LTX["num_layers"],
        width=heads * head_dim,
        num_heads=heads,
        patch_size=[1, 1, 1],
        pretrained=ltx,
    )
    return geometry, ltx


def a14b_geometry(path: Path) -> tuple[ModelConfig, PretrainedConfig]:
    wan = PretrainedConfig(
        family="wan2.2_a14b",
        path=str(path),
        text_dim=TINY_WAN["text_dim"],
        config={"ffn_dim": TINY_WAN["ffn_dim"]},
    )
    heads, head_dim = TINY_WAN["num_attention_heads"], TINY_WAN["attention_head_dim"]
    return ModelConfig(depth=2, width=heads * head_dim, num_heads=heads, pretrained=wan), wan


def cogvideox_geometry(path: Path) -> tuple[ModelConfig, PretrainedConfig]:
    cog = PretrainedConfig(
        family="cogvideox",
        path=str(path),
        in_channels=TINY_COGVIDEOX["in_channels"],
        text_dim=TEXT_DIM,
        config={"sample_height": 8, "sample_width": 8},
    )
    heads, head_dim = TINY_COGVIDEOX["num_attention_heads"], TINY_COGVIDEOX["attention_head_dim"]
    geometry = ModelConfig(
        depth=2, width=heads * head_dim, num_heads=heads, patch_size=[2, 2, 2], pretrained=cog
    )
    return geometry, cog


def hunyuan_geometry(path: Path) -> tuple[ModelConfig, PretrainedConfig]:
    hunyuan = PretrainedConfig(
        family="hunyuan_video",
        path=str(path),
        in_channels=TINY_HUNYUAN["in_channels"],
        text_dim=TEXT_DIM,
        config={"num_layers": 1, "num_single_layers": 1},
        guidance=6.0,
    )
    heads, head_dim = TINY_HUNYUAN["num_attention_heads"], TINY_HUNYUAN["attention_head_dim"]
    return ModelConfig(
        depth=2, width=heads * head_dim, num_heads=heads, pretrained=hunyuan
    ), hunyuan


@pytest.fixture(scope="module")
def hunyuan_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hunyuan") / "pipeline"
    tiny_hunyuan_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cogvideox_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cogvideox") / "pipeline"
    tiny_cogvideox_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ltx_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ltx") / "pipeline"
    tiny_ltx_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def a14b_folder(tmp_path_factory) -> Path:
    return save_tiny_a14b(tmp_path_factory.mktemp("a14b") / "pipeline")


@pytest.fixture(scope="module")
def wan_i2v_folder(tmp_path_factory) -> Path:
    return save_tiny_wan_i2v_a14b(tmp_path_factory.mktemp("wan_i2v") / "pipeline")


def inputs(channels: int, text_dim: int, batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, 3, 4, 6, generator=generator)
    t = torch.rand(batch, generator=generator)
    text = torch.randn(batch, 7, text_dim, generator=generator)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[1, 4:] = False
    return x, t, text, mask


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_ltx_video_gives_the_velocity_of_its_pipelines_call(ltx_folder):
    model = load_pretrained(*ltx_geometry(ltx_folder))
    reference = LTXVideoTransformer3DModel.from_pretrained(ltx_folder / "transformer").eval()
    x, t, text, mask = inputs(TINY_LTX["in_channels"], TEXT_DIM)
    frames, height, width = x.shape[2:]

    def theirs(timestep: torch.Tensor, frame_rate: float) -> torch.Tensor:
        """LTXPipeline's call: packed tokens, the 0..1000 step, the caption mask, rotary
        positions scaled by the autoencoder's stride over the frame rate."""
        out = reference(
            hidden_states=LTXPipeline._pack_latents(x, 1, 1),
            encoder_hidden_states=text,
            timestep=timestep,
            encoder_attention_mask=mask,
            num_frames=frames,
            height=height,
            width=width,
            rope_interpolation_scale=(LTX_STRIDE[0] / frame_rate, *LTX_STRIDE[1:]),
            return_dict=False,
        )[0]
        return LTXPipeline._unpack_latents(out, frames, height, width, 1, 1)

    expected = theirs(t * 1000, 24.0)
    ours = model(x, t, text, mask, fps=torch.full((2,), 24.0))
    print(f"\nLTX-Video t2v: max relative difference {relative(ours, expected):.3g}")
    assert relative(ours, expected) <= 1e-6 and expected.abs().max() > 0.1
    # Without a frame rate, the pipeline's default of 25; the frame rate moves the rotary table.
    assert relative(model(x, t, text, mask), theirs(t * 1000, 25.0)) <= 1e-6
    assert relative(model(x, t, text, mask, fps=torch.full((2,), 12.0)), expected) > 1e-4

    # LTXImageToVideoPipeline: the step times (1 - conditioning mask), 0 on the first frame.
    given = torch.tensor([[True, False, False], [False, False, False]])
    per_frame = t[:, None].expand(2, 3).masked_fill(given, 0.0)
    tokens_per_frame = height * width
    timestep = (per_frame * 1000).repeat_interleave(tokens_per_frame, dim=1)
    ours = model(x, per_frame, text, mask, given=given, fps=torch.full((2,), 24.0))
    print(f"LTX-Video i2v: max relative difference {relative(ours, theirs(timestep, 24.0)):.3g}")
    assert relative(ours, theirs(timestep, 24.0)) <= 1e-6
    assert relative(ours, expected) > 1e-4


def test_a14b_sends_each_sample_to_the_expert_of_its_noise_level(a14b_folder):
    model = load_pretrained(*a14b_geometry(a14b_folder))
    high = WanTransformer3DModel.from_pretrained(a14b_folder / "transformer").eval()
    low = WanTransformer3DModel.from_pretrained(a14b_folder / "transformer_2").eval()
    x, _, text, mask = inputs(16, TINY_WAN["text_dim"], batch=4)
    t = torch.tensor([0.95, 0.3, 0.875, 0.5])  # the pipeline: t >= boundary is `transformer`'s
    context = text * mask[..., None]
    with torch.no_grad():
        ours = model(x, t, text, mask)
        for expert, rows in ((high, [0, 2]), (low, [1, 3])):
            theirs = expert(x[rows], t[rows] * 1000, context[rows], return_dict=False)[0]
            assert relative(ours[rows], theirs) <= 1e-6
        other = low(x[:1], t[:1] * 1000, context[:1], return_dict=False)[0]
        assert relative(ours[:1], other) > 1e-3, "the experts differ: the choice is seen"

    # All samples at high noise: the low-noise expert still runs forward and backward (with a
    # zero gradient), so sharded experts gather and reduce alike on every rank.
    model.train()
    model(x[[0, 2]], t[[0, 2]], text[[0, 2]], mask[[0, 2]]).square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert all(not g.any() for n, g in grads.items() if n.startswith("transformer_2."))
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("transformer."))


def composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    from train.config import register_configs, to_config

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


@torch.no_grad()
def test_wan_i2v_a14b_is_shown_the_given_frames_as_its_pipeline_shows_them(wan_i2v_folder):
    """The trainer's condition of an i2v and a first-and-last-frame sample is what
    WanImageToVideoPipeline.prepare_latents makes of the same images, and each expert (boundary
    0.9) takes it beside the noisy latents as its pipeline does."""
    from types import SimpleNamespace

    from train.encoders import FrozenEncoders, video_to_float
    from train.latent_source import OnlineLatents
    from train.objectives import FlowMatchingObjective

    config = composed(*a14b_overrides(wan_i2v_folder, "wan_i2v_finetune"))
    cpu = torch.device("cpu")
    source = OnlineLatents(FrozenEncoders(config, cpu), config.model.patch_size)
    objective = FlowMatchingObjective(
        source, config.flow, config.conditioning, lambda tokens: 0.0, 0, given_as_channels=True
    )
    clips = torch.randint(0, 256, (2, 9, 32, 48, 3), dtype=torch.uint8)  # 3 latent frames of 4x6
    given = torch.tensor([[True, False, False], [True, False, True]])  # i2v; connect
    condition = objective.given_channels(SimpleNamespace(video=clips), given, cpu)

    pipe = WanImageToVideoPipeline.from_pretrained(wan_i2v_folder)
    pixels = video_to_float(clips, cpu)  # (2, 3, 9, 32, 48)
    for row, last in ((0, None), (1, pixels[1:, :, -1])):
        _, theirs = pipe.prepare_latents(
            pixels[row : row + 1, :, 0], 1, 16, 32, 48, 9, torch.float32, cpu, last_image=last
        )
        print(f"\nWan I2V condition ({'i2v' if last is None else 'first and last'}): max "
              f"relative difference {relative(condition[row : row + 1], theirs):.3g}")  # fmt: skip
        assert condition.shape == (2, 4 + 16, 3, 4, 6)
        assert relative(condition[row : row + 1], theirs) <= 1e-6

    model = load_pretrained(config.model, config.model.pretrained)
    x, _, text, mask = inputs(16, TINY_WAN["text_dim"])
    t = torch.tensor([0.95, 0.5])  # one sample for each expert
    ours = model(x, t, text, mask, condition=condition)
    context = text * mask[..., None]
    for row, expert in enumerate(("transformer", "transformer_2")):
        reference = WanTransformer3DModel.from_pretrained(wan_i2v_folder / expert).eval()
        pipeline_input = torch.cat([x, condition], dim=1)[row : row + 1]
        theirs = reference(pipeline_input, t[row : row + 1] * 1000, context[row : row + 1])[0]
        print(
            f"Wan I2V {expert}: max relative difference {relative(ours[row : row + 1], theirs):.3g}"
        )
        assert relative(ours[row : row + 1], theirs) <= 1e-6 and theirs.abs().max() > 0.1
    assert relative(model(x, t, text, mask, condition=torch.zeros_like(condition)), ours) > 1e-3
    with pytest.raises(ValueError, match="family=wan2.2_i2v_a14b needs given frames as input"):
        model(x, t, text, mask)


@torch.no_grad()
def test_hunyuan_video_captions_and_velocity_are_its_pipelines(hunyuan_folder):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    pipe = HunyuanVideoPipeline.from_pretrained(hunyuan_folder)
    captions = ["a rabbit in the snow", "two boats at dawn, seen from a bridge"]
    encoder = HunyuanVideoTextEncoder(
        TextEncoderConfig(
            kind="hunyuan_video",
            path=str(hunyuan_folder),
            max_length=17,
            template_crop=HUNYUAN_TEMPLATE_CROP,
        )
    )
    text, mask = encoder.encode(captions)
    template = {**DEFAULT_PROMPT_TEMPLATE, "crop_start": HUNYUAN_TEMPLATE_CROP}
    states, pooled, their_mask = pipe.encode_prompt(
        captions, prompt_template=template, max_sequence_length=16, device="cpu"
    )
    assert text.shape == (2, 17, TEXT_DIM) and mask[:, -1].all()
    assert torch.equal(mask[:, :-1], their_mask.bool()) and not mask[:, :-1].all()
    assert relative(text[:, :-1], states) <= 1e-6
    assert relative(text[:, -1, :16], pooled) <= 1e-6 and not text[:, -1, 16:].any()

    model = load_pretrained(*hunyuan_geometry(hunyuan_folder))
    reference = HunyuanVideoTransformer3DModel.from_pretrained(hunyuan_folder / "transformer")
    x, t, _, _ = inputs(TINY_HUNYUAN["in_channels"], TEXT_DIM)
    ours = model(x, t, text, mask)
    theirs = reference.eval()(
        hidden_states=x,
        timestep=t * 1000,
        encoder_hidden_states=states,
        encoder_attention_mask=their_mask,
        pooled_projections=pooled,
        guidance=torch.full((2,), 6.0 * 1000),
        return_dict=False,
    )[0]
    print(f"\nHunyuanVideo: max relative difference {relative(ours, theirs):.3g}")
    assert relative(ours, theirs) <= 1e-6 and theirs.abs().max() > 0.1
    assert len(model.blocks) == 2  # a double-stream and a single-stream block


def test_cogvideox_v_prediction_becomes_the_flow_velocity(cogvideox_folder):
    model = load_pretrained(*cogvideox_geometry(cogvideox_folder))
    pipe = CogVideoXPipeline.from_pretrained(cogvideox_folder)
    reference = CogVideoXTransformer3DModel.from_pretrained(cogvideox_folder / "transformer").eval()
    schedule = pipe.scheduler.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(4)
    x0, noise = (torch.randn(3, 4, 4, 4, 6, generator=generator, dtype=torch.float64) for _ in "ab")
    steps = torch.tensor([999, 600, 37])
    a = schedule[steps].view(-1, 1, 1, 1, 1)
    t = (1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt())  # the flow time of each step
    norm = ((1 - t) ** 2 + t**2).sqrt()
    x_t = (1 - t) * x0 + t * noise
    x_step = a.sqrt() * x0 + (1 - a).sqrt() * noise
    assert torch.allclose(x_t, norm * x_step, rtol=1e-12, atol=1e-12)
    # The algebra: the true v gives the true flow velocity.
    v_true = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose((2 * t - 1) / norm**2 * x_t + v_true / norm, noise - x0, atol=1e-12)

    text = torch.randn(3, 7, TEXT_DIM, generator=generator)
    mask = torch.ones(3, 7, dtype=torch.bool)
    with torch.no_grad():
        ours = model(x_t.float(), t.flatten().float(), text, mask)
        rotary = pipe._prepare_rotary_positional_embeddings(32, 48, 4, torch.device("cpu"))
        v = reference(
            hidden_states=x_step.float().transpose(1, 2),
            encoder_hidden_states=text,
            timestep=steps,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0].transpose(1, 2)
    expected = ((2 * t - 1) / norm**2 * x_t + v.double() / norm).float()
    print(f"\nCogVideoX: max relative difference {relative(ours, expected):.3g}")
    assert relative(ours, expected) <= 1e-6 and v.abs().max() > 0.1
    with pytest.raises(ValueError, match="family=cogvideox has one time per sample"):
        model(
            x_t.float(), t.flatten().float(), text, mask, given=torch.ones(3, 4, dtype=torch.bool)
        )


def test_captions_are_encoded_as_the_cogvideox_pipeline_encodes_them(cogvideox_folder):
    """padding=encoded: T5 reads the padding too and every state counts, as CogVideoXPipeline's
    encode_prompt gives them; the default (masked) differs on the padding."""
    pipe = CogVideoXPipeline.from_pretrained(cogvideox_folder)
    captions = ["a rabbit in the snow", "two boats"]
    theirs, _ = pipe.encode_prompt(
        captions, do_classifier_free_guidance=False, max_sequence_length=16, device="cpu"
    )
    folders = {"path": str(cogvideox_folder / "text_encoder"),
               "tokenizer_path": str(cogvideox_folder / "tokenizer"), "max_length": 16}  # fmt: skip
    encoded = TextEncoder(TextEncoderConfig(**folders, padding="encoded"))
    states, mask = encoded.encode(captions)
    print(f"\nencoded as CogVideoXPipeline: relative difference {relative(states, theirs):.3g}")
    assert mask.all() and relative(states, theirs) <= 1e-6
    masked, masked_mask = TextEncoder(TextEncoderConfig(**folders)).encode(captions)
    assert not masked_mask.all() and relative(masked, theirs) > 1e-2
    with pytest.raises(ValueError, match="text_encoder.padding='both' is not one of"):
        TextEncoder(TextEncoderConfig(**folders, padding="both"))


def test_saving_back_loads_in_diffusers_with_identical_tensors(
    ltx_folder, a14b_folder, hunyuan_folder, cogvideox_folder, tmp_path
):
    for name, (geometry, folder, model_class) in {
        "ltx": (ltx_geometry, ltx_folder, LTXVideoTransformer3DModel),
        "a14b": (a14b_geometry, a14b_folder, WanTransformer3DModel),
        "hunyuan": (hunyuan_geometry, hunyuan_folder, HunyuanVideoTransformer3DModel),
        "cogvideox": (cogvideox_geometry, cogvideox_folder, CogVideoXTransformer3DModel),
    }.items():
        model = load_pretrained(*geometry(folder))
        written = save_pretrained(model, tmp_path / name, max_shard_size="20KB")
        assert [p.name for p in written] == list(model.family.experts)
        for expert in written:
            assert len(list(expert.glob("*.safetensors"))) > 1  # sharded, with an index
            saved = model_class.from_pretrained(expert).state_dict()
            original = model_class.from_pretrained(folder / expert.name).state_dict()
            assert saved.keys() == original.keys()
            assert all(torch.equal(saved[k], original[k]) for k in original)


def test_a_folder_of_another_family_or_without_an_expert_fails_naming_the_file(
    ltx_folder, a14b_folder, tmp_path
):
    with pytest.raises(
        PretrainedFolderError,
        match=f"{a14b_folder / 'transformer' / 'config.json'} is the config of a "
        "'WanTransformer3DModel', not of the LTXVideoTransformer3DModel of "
        "model.pretrained.family=ltx_video",
    ):
        load_pretrained(*ltx_geometry(a14b_folder))
    one_expert = tmp_path / "one_expert"
    shutil.copytree(a14b_folder, one_expert, ignore=shutil.ignore_patterns("transformer_2"))
    with pytest.raises(PretrainedFolderError, match=f"no transformer_2 in {one_expert}"):
        load_pretrained(*a14b_geometry(one_expert))
    other = tmp_path / "other"
    shutil.copytree(ltx_folder / "transformer", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "caption_channels": 64}))
    with pytest.raises(
        PretrainedFolderError,
        match=f"{other / 'config.json'} is another model .*caption_channels=64 "
        f"\\(the preset has {TEXT_DIM}\\)",
    ):
        load_pretrained(*ltx_geometry(other))


# family -> (its pipeline class, the input it trains on: channels and frames, pipeline video size)
LORA_CASES = {
    "ltx_video": (LTXPipeline, 8, 3, {"height": 64, "width": 64, "num_frames": 9}),
    "hunyuan_video": (HunyuanVideoPipeline, 4, 3, {"height": 32, "width": 32, "num_frames": 5}),
    "cogvideox": (CogVideoXPipeline, 4, 4, {"height": 32, "width": 32, "num_frames": 5}),
    # (4 steps: the low-noise expert denoises the last ones)
    "wan2.2_a14b": (WanPipeline, 16, 3, {"height": 32, "width": 32, "num_frames": 5, "steps": 4}),
}


def pipeline_video(pipe, size: dict) -> torch.Tensor:
    extra = {} if isinstance(pipe, WanPipeline) else {"max_sequence_length": 16}
    size = dict(size)
    return pipe(
        prompt="a rabbit",
        num_inference_steps=size.pop("steps", 2),
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **size,
        **extra,
    ).frames


@pytest.mark.parametrize("family", LORA_CASES)
def test_lora_trains_only_adapters_and_its_export_changes_the_pipelines_video(
    family, request, tmp_path
):
    """The family's LoRA targets adapt, a few AdamW steps move only them (the base bitwise), and
    the export loads with the pipeline's load_lora_weights and changes its video. A14B: the
    adapter on the low-noise expert only (model.pretrained.train_experts)."""
    from train.config import OptimConfig, ParallelConfig
    from train.parallel import ParallelDims, build_engine

    pipeline_class, channels, frames, size = LORA_CASES[family]
    name = {"ltx_video": "ltx", "hunyuan_video": "hunyuan", "wan2.2_a14b": "a14b"}.get(
        family, family
    )
    folder = request.getfixturevalue(f"{name}_folder")
    geometry, pretrained = globals()[f"{name}_geometry"](folder)
    pretrained.train_experts = ["transformer_2"]
    model = load_pretrained(geometry, pretrained)
    add_lora(model, 4, 8.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    if family == "wan2.2_a14b":
        assert all(n.startswith("transformer_2.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    dims = ParallelDims.resolve(ParallelConfig(), 1)
    optim = OptimConfig(lr=5e-2, warmup_steps=1, weight_decay=0.0)
    engine = build_engine(model, ParallelConfig(), optim, dims, 1, 3)
    for step in range(3):
        x, _, text, mask = inputs(channels, TEXT_DIM if family != "wan2.2_a14b" else 32, seed=step)
        x = x[:, :, :frames] if x.shape[2] >= frames else torch.cat([x, x[:, :, :1]], 2)
        t = torch.full((2,), 0.3)  # below A14B's boundary: its low-noise expert
        engine.micro_step(model(x, t, text, mask).square().mean())
        engine.finish_step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before if n not in trainable)
    assert all(not torch.equal(after[n], before[n]) for n in trainable if ".lora_B." in n)

    save_lora(model, tmp_path / "lora")
    pipe = pipeline_class.from_pretrained(folder)
    plain = pipeline_video(pipe, size)
    if family == "wan2.2_a14b":
        pipe.load_lora_weights(tmp_path / "lora" / "transformer_2", load_into_transformer_2=True)
    else:
        pipe.load_lora_weights(tmp_path / "lora")
    adapted = pipeline_video(pipe, size)
    print(
        f"\n{family}: the trained LoRA changes the video by up to {(adapted - plain).abs().max():.3g}"
    )
    assert torch.isfinite(adapted).all() and (adapted - plain).abs().max() > 1e-4


# Parameters of each preset's transformer(s) as published (billions, rounded to their tenth).
PUBLISHED_SIZES = {
    "wan2.1_t2v_1.3b": 1.4,
    "wan2.1_t2v_14b": 14.3,
    "wan2.2_ti2v_5b": 5.0,
    "wan2.2_t2v_a14b": 2 * 14.3,
    "wan2.2_i2v_a14b": 2 * 14.3,
    "ltx_video_2b": 1.9,
    "hunyuan_video_13b": 12.8,
    "cogvideox1.5_5b": 5.6,
}


def test_every_preset_builds_its_family_at_the_published_size():
    from bench.pretrained_memory import meta_transformer, preset, pretrained_presets

    assert sorted(PUBLISHED_SIZES) == pretrained_presets()
    for name, billions in PUBLISHED_SIZES.items():
        geometry = preset(name)
        experts = len(FAMILIES[geometry.pretrained.family].experts)
        count = experts * sum(
            p.numel() for p in meta_transformer(geometry, geometry.pretrained).parameters()
        )
        print(f"{name}: {count / 1e9:.2f}B parameters")
        assert abs(count / 1e9 - billions) < 0.06, name


def test_family_presets_compose_and_refuse_what_their_family_cannot_do():
    from hydra import compose, initialize_config_dir

    from train.config import register_configs, to_config

    register_configs()
    root = Path(__file__).resolve().parents[1]

    def config(*overrides: str):
        with initialize_config_dir(config_dir=str(root / "conf"), version_base=None):
            return to_config(compose("config", overrides=list(overrides)))

    path = "model.pretrained.path=/data/model"
    ltx = config("experiment=ltx_finetune", path)
    assert ltx.model.pretrained.family == "ltx_video" and ltx.text_encoder.max_length == 128
    assert ltx.text_encoder.path == "/data/model/text_encoder" and ltx.conditioning.t2v < 1
    hunyuan = config("experiment=hunyuan_video_finetune", path)
    assert (
        hunyuan.text_encoder.kind == "hunyuan_video" and hunyuan.text_encoder.path == "/data/model"
    )
    cogvideox = config("experiment=cogvideox_finetune", path)
    assert cogvideox.text_encoder.padding == "encoded" and cogvideox.model.patch_size == [2, 2, 2]
    refusals = {
        "family=cogvideox has one time per sample": ["experiment=cogvideox_finetune", "conditioning=mixed"],
        "family=hunyuan_video reads captions of text_encoder.kind=hunyuan_video": [
            "experiment=hunyuan_video_finetune", "text_encoder=t5"],
        "family=cogvideox splits its sequence with Ulysses only": [
            "experiment=cogvideox_finetune", "parallel.cp=2"],
        "family=hunyuan_video splits its sequence with Ulysses only": [
            "experiment=hunyuan_video_finetune", "parallel.cp=2"],
        "train_experts=\\['transformer_3'\\]": [
            "experiment=wan_finetune", "model=wan2.2_t2v_a14b", "model.pretrained.train_experts=[transformer_3]"],
        "model.pretrained.family='sora'": ["experiment=wan_finetune", "model.pretrained.family=sora"],
        "family=wan2.2_i2v_a14b is shown a first image .*conditioning.extend_forward=0.1": [
            "experiment=wan_i2v_finetune", "conditioning.connect=0", "conditioning.extend_forward=0.1"],
        "train.sample_prompts=\\['a rabbit'\\]: .*needs an image": [
            "experiment=wan_i2v_finetune", "train.sample_prompts=[a rabbit]"],
        "conditioning.given_frames=\\[1, 2\\]": [
            "experiment=wan_i2v_finetune", "conditioning.given_frames=[1,2]"],
    }  # fmt: skip
    for message, overrides in refusals.items():
        with pytest.raises(ValueError, match=message):
            config(*overrides, path)
