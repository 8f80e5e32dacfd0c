"""The quality metrics against closed forms and hand computations, with tiny random networks of
the real kinds (a TorchScript module with I3D's call signature, VideoMAE and CLIP saved by
`transformers`) written to tmp_path and loaded back the way a run loads the real ones."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from models import CLIP_WORDS as WORDS
from models import FEATURES, save_tiny_clip, save_tiny_i3d
from torch import Tensor
from transformers import (
    AutoImageProcessor,
    CLIPModel,
    VideoMAEConfig,
    VideoMAEImageProcessor,
    VideoMAEModel,
)

from train.quality import ClipScorer, VideoFeatures, frechet_distance, fvd

# The real I3D ships only as TorchScript, which torch 2.13 deprecates (it still loads it).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")

CLIPS = 32  # clips per set: 4x the tiny networks' feature dimension, so covariances are full rank


def moving_patterns(n: int, frames: int = 8, height: int = 40, width: int = 48) -> Tensor:
    """(n, 3, frames, height, width) in [-1, 1], seeded: a coloured wave travelling in a random
    direction and a bright blob drifting across it."""
    g = torch.Generator().manual_seed(0)

    def draw(*shape: int) -> Tensor:
        return torch.rand(n, *shape, 1, 1, 1, generator=g)

    t = torch.arange(frames).view(-1, 1, 1) / frames
    y, x = torch.linspace(0, 1, height).view(-1, 1), torch.linspace(0, 1, width)
    angle, freq, speed = 2 * math.pi * draw(), 1 + 3 * draw(), 2 * draw() - 1
    along = x * angle.cos() + y * angle.sin()
    wave = torch.sin(2 * math.pi * (freq * along - speed * t))
    cx, cy, vx, vy = draw(), draw(), draw() - 0.5, draw() - 0.5
    blob = torch.exp(-((x - cx - vx * t) ** 2 + (y - cy - vy * t) ** 2) / 0.02)
    colour = 2 * draw(3) - 1  # (n, 3, 1, 1, 1)
    return (0.6 * colour * wave[:, None] + 0.8 * blob[:, None] - 0.2).clamp(-1, 1)


def with_moments(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n samples whose empirical mean and (unbiased) covariance are exactly `mean` and `cov`."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # empirical cov = I
    return mean + z @ np.linalg.cholesky(cov).T


def test_frechet_distance_is_the_closed_form_for_known_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    a = with_moments(rng, 200, mu1, np.diag(var1))
    b = with_moments(rng, 300, mu2, np.diag(var2))
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    shifted = a + 3.0  # only the means differ: ||mu1 - mu2||^2 = D * 9
    assert frechet_distance(a, shifted) == pytest.approx(5 * 9, rel=1e-9)


def test_frechet_distance_matches_an_independent_computation():
    """Random full covariances; the trace of (S1 S2)^(1/2) independently, as the sum of the
    square roots of the eigenvalues of S1 S2 (real and non-negative: S1 S2 is similar to
    S1^(1/2) S2 S1^(1/2))."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(80, 6)) @ rng.normal(size=(6, 6)) + 0.5
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_root = np.sum(np.sqrt(scipy.linalg.eigvals(s1 @ s2).real))
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2) - 2 * trace_root
    got = frechet_distance(a, b)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a, b[:, :5])


@pytest.fixture
def i3d(tmp_path) -> VideoFeatures:
    return VideoFeatures(save_tiny_i3d(tmp_path / "i3d_torchscript.pt"))


def tiny_videomae(folder, seed: int = 0) -> None:
    torch.manual_seed(seed)
    config = VideoMAEConfig(
        image_size=32,
        patch_size=8,
        num_frames=4,
        tubelet_size=2,
        hidden_size=FEATURES,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
    )
    VideoMAEModel(config).eval().save_pretrained(folder)
    VideoMAEImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.4, 0.5, 0.6],
        image_std=[0.2, 0.25, 0.3],
    ).save_pretrained(folder)


@pytest.fixture
def videomae(tmp_path) -> VideoFeatures:
    tiny_videomae(tmp_path / "videomae")
    return VideoFeatures(tmp_path / "videomae")


@pytest.mark.parametrize("network", ["i3d", "videomae"])
def test_fvd_is_zero_on_the_same_clips_and_rises_with_noise(network, request):
    features = request.getfixturevalue(network)
    assert features.kind == network
    clips = moving_patterns(CLIPS)
    own = features(clips)
    assert own.shape == (CLIPS, FEATURES) and own.dtype == torch.float64
    scale = np.trace(np.cov(own.numpy(), rowvar=False))
    assert abs(fvd(features, clips, clips, batch=5)) < 1e-6 * scale
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(1))
    distances = [fvd(features, clips, clips + level * noise) for level in (0.05, 0.2, 0.5)]
    assert 1e-6 * scale < distances[0] < distances[1] < distances[2], distances


def test_features_are_batch_independent(i3d, videomae):
    """The batch only bounds memory: the clips' features are the same in any batches."""
    clips = moving_patterns(6)
    for features in (i3d, videomae):
        whole = features(clips)
        parts = torch.cat([features(clips[:2]), features(clips[2:])])
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


def test_i3d_features_are_its_logits_on_the_pixels_at_224(i3d):
    """At 224x224 nothing is resized: the detector sees the [-1, 1] pixels themselves."""
    clips = moving_patterns(2, frames=4, height=224, width=224)
    detector = torch.jit.load(str(i3d.path)).eval()
    with torch.no_grad():
        expected = detector(clips, rescale=False, resize=False, return_features=True).double()
    torch.testing.assert_close(i3d(clips), expected, rtol=1e-5, atol=1e-6)


def test_videomae_features_are_the_mean_last_hidden_state_of_processor_normalised_frames(videomae):
    """At the model's own size and clip length the folder's image processor only normalises:
    the features are the model's mean last hidden state on its output."""
    clips = moving_patterns(3, frames=4, height=32, width=32)
    processor = AutoImageProcessor.from_pretrained(videomae.path)
    videos = ((clips + 1) / 2).permute(0, 2, 3, 4, 1).numpy()  # (N, T, H, W, 3)
    pixels = processor(
        [list(video) for video in videos],
        do_resize=False,
        do_center_crop=False,
        do_rescale=False,
        return_tensors="pt",
    )["pixel_values"]
    assert pixels.shape == (3, 4, 3, 32, 32)
    model = VideoMAEModel.from_pretrained(videomae.path).eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state.mean(1).double()
    torch.testing.assert_close(videomae(clips), expected, rtol=1e-5, atol=1e-6)


def test_videomae_picks_frames_evenly_from_long_clips_and_pads_short_ones(videomae):
    """Its position embeddings take num_frames=4 frames: 8 become frames 0, 2, 5, 7 (the
    rounded evenly spaced positions) and 3 become 0, 1, 2, 2."""
    clips = moving_patterns(2)
    torch.testing.assert_close(videomae(clips), videomae(clips[:, :, [0, 2, 5, 7]]))
    torch.testing.assert_close(videomae(clips[:, :, :3]), videomae(clips[:, :, [0, 1, 2, 2]]))
    assert not torch.allclose(videomae(clips), videomae(clips[:, :, :4]))


def test_fingerprints_name_the_network_files(tmp_path, i3d, videomae):
    assert i3d.fingerprint() == hashlib.sha256(i3d.path.read_bytes()).hexdigest()
    before = videomae.fingerprint()
    assert len(before) == 64 and VideoFeatures(videomae.path).fingerprint() == before
    tiny_videomae(tmp_path / "other", seed=1)  # the same config, other weights
    assert VideoFeatures(tmp_path / "other").fingerprint() != before
    (videomae.path / ".cache").mkdir()
    (videomae.path / ".cache" / "download.lock").write_text("hub metadata")
    assert videomae.fingerprint() == before  # hidden files are left out
    (videomae.path / "notes.txt").write_text("x")
    with_notes = videomae.fingerprint()
    (videomae.path / "notes.txt").rename(videomae.path / "other.txt")
    assert len({before, with_notes, videomae.fingerprint()}) == 3  # contents and names count


@pytest.mark.parametrize("network", ["videomae", "clip"])
@pytest.mark.parametrize("size", [(40, 48), (48, 40), (24, 30)])
def test_frames_are_resized_and_cropped_as_the_folders_image_processor_does(
    network, size, videomae, clip_folder
):
    """Shorter side to the processor's size, centre crop, normalisation: the processor's own
    output to within PIL's 8-bit rounding and its bicubic kernel (a = -0.5, torch's -0.75)."""
    prep = videomae.prep if network == "videomae" else ClipScorer(clip_folder).prep
    processor = AutoImageProcessor.from_pretrained(
        videomae.path if network == "videomae" else clip_folder
    )
    clips = moving_patterns(2, frames=4, height=size[0], width=size[1])
    frames = ((clips + 1) / 2).permute(0, 2, 3, 4, 1).flatten(0, 1).numpy()  # (N*T, H, W, 3)
    images = [list(frames)] if network == "videomae" else list(frames)  # VideoMAE's: one video
    expected = processor(images, do_rescale=False, return_tensors="pt")["pixel_values"]
    expected = expected.flatten(0, -4)  # (N*T, 3, 32, 32) from either
    got = prep(clips.transpose(1, 2).flatten(0, 1))
    assert got.shape == expected.shape == (8, 3, 32, 32)
    error = (got - expected).abs()
    assert error.max() < 0.1 and error.mean() < 0.02, (error.max(), error.mean())


@pytest.fixture
def clip_folder(tmp_path):
    return save_tiny_clip(tmp_path / "clip")


def test_clip_score_is_the_mean_frame_cosine_to_the_prompt(clip_folder):
    """By hand: the folder's processor normalises the frames (at the model's size nothing is
    resized), CLIPModel's forward gives normalised image and text embeddings, and the score is
    the mean over frames of their dot products."""
    clips = moving_patterns(3, frames=5, height=32, width=32)
    prompts = ["a red ball rolls left", "a blue square moves right", "red square"]
    scores = ClipScorer(clip_folder)(clips, prompts)

    processor = AutoImageProcessor.from_pretrained(clip_folder)
    frames = ((clips + 1) / 2).permute(0, 2, 3, 4, 1).flatten(0, 1).numpy()
    pixels = processor(
        images=list(frames),
        do_resize=False,
        do_center_crop=False,
        do_rescale=False,
        return_tensors="pt",
    )["pixel_values"]
    ids = [[2, *(WORDS.index(w) for w in p.split()), 3] for p in prompts]
    longest = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (longest - len(i)) for i in ids])
    model = CLIPModel.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=input_ids.ne(0), pixel_values=pixels)
    expected = torch.einsum("ntd,nd->nt", out.image_embeds.unflatten(0, (3, 5)), out.text_embeds)
    torch.testing.assert_close(scores, expected.mean(1), rtol=1e-5, atol=1e-5)
    assert scores.shape == (3,) and scores.abs().max() <= 1

    swapped = ClipScorer(clip_folder)(clips, prompts[::-1])
    assert not torch.allclose(swapped, scores)
    with pytest.raises(ValueError, match="3 videos but 2 prompts"):
        ClipScorer(clip_folder)(clips, prompts[:2])


def test_bad_paths_raise_naming_the_path(tmp_path, clip_folder):
    missing, empty, bert = tmp_path / "nowhere", tmp_path / "empty", tmp_path / "bert"
    empty.mkdir()
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    text_file = tmp_path / "notes.pt"
    text_file.write_text("not TorchScript")
    bad = (missing, empty, bert, text_file)
    for path in bad:
        with pytest.raises(ValueError, match="expected an I3D TorchScript file") as error:
            VideoFeatures(path)
        assert str(path) in str(error.value)
    for path in bad:
        with pytest.raises(ValueError, match="expected a CLIP folder") as error:
            ClipScorer(path)
        assert str(path) in str(error.value)
    with pytest.raises(ValueError, match="expected an I3D"):
        VideoFeatures(clip_folder)  # CLIP is not a video network
