"""Packed sequences in the DiT (NaViT): samples of different shapes in one token sequence get the
velocities, losses and parameter gradients they get alone, and attention stays block-diagonal."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from models import perturbed_tiny_dit

from model.attention import Segments, attention
from model.flow import training_loss
from train.parallel.parallelize import apply_activation_checkpointing

IN_CHANNELS, TEXT_DIM = 4, 8
# (T, H, W) latents, patch (1, 2, 2): an image, then videos with H != W and H = W, two of one
# shape side by side (a group of two: their attention runs batched, each with its own caption);
# 82 tokens.
SHAPES = [(1, 4, 6), (3, 8, 4), (2, 6, 6), (2, 6, 6), (4, 2, 8)]
GROUP_SIZES = [1, 1, 2, 1]
SEQUENCE_LENGTH = 90  # 8 tokens of padding
GIVEN = [[False], [True, False, False], [False, False], [False, True], [True, True, False, False]]


def grouped(per_sample: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Per-sample tensors stacked into the pack's shape groups, as the packed DiT takes them."""
    if per_sample is None:
        return None
    bounds = itertools.pairwise([0, *itertools.accumulate(GROUP_SIZES)])
    return [torch.stack(per_sample[start:stop]) for start, stop in bounds]


def pack(with_given: bool) -> dict:
    """Latents, noise, captions, times, frame weights and micro-conditions of the samples of
    SHAPES, each its own (seed 0), and with_given the GIVEN frames."""
    generator = torch.Generator().manual_seed(0)
    count = len(SHAPES)
    x0 = [torch.randn(IN_CHANNELS, *shape, generator=generator) for shape in SHAPES]
    mask = torch.arange(6)[None, :] < torch.tensor([[2], [6], [1], [3], [4]])
    inputs = {
        "x0": x0,
        "noise": [torch.randn(x.shape, generator=generator) for x in x0],
        "text": torch.randn(count, 6, TEXT_DIM, generator=generator),
        "mask": mask,
        "t": torch.rand(count, generator=generator),
        "frame_weight": [torch.linspace(1.0, 0.5, shape[0]) for shape in SHAPES],
        "micro": {
            "fps": torch.tensor([8.0, 24.0, 12.0, 10.0, 30.0]),
            "native_size": torch.tensor(
                [[240.0, 360.0], [640.0, 320.0], [480.0, 480.0], [320.0, 320.0], [90.0, 360.0]]
            ),
        },
        "given": None,
    }
    if with_given:
        inputs["given"] = [torch.tensor(frames) for frames in GIVEN]
    return inputs


def per_frame_times(inputs: dict) -> list[torch.Tensor]:
    """The times the model sees: the sample's time, per frame with 0 on given frames."""
    if inputs["given"] is None:
        return list(inputs["t"])
    return [
        t.expand(len(g)).masked_fill(g, 0.0)
        for t, g in zip(inputs["t"], inputs["given"], strict=True)
    ]


def sample(inputs: dict, i: int) -> dict:
    """Sample i's inputs as a dense batch of one."""

    def one(value):
        return None if value is None else value[i][None]

    return {
        "x0": one(inputs["x0"]),
        "noise": one(inputs["noise"]),
        "text": one(inputs["text"]),
        "mask": one(inputs["mask"]),
        "t": one(inputs["t"]),
        "frame_weight": one(inputs["frame_weight"]),
        "micro": {name: one(value) for name, value in inputs["micro"].items()},
        "given": one(inputs["given"]),
    }


def gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_relatively_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item()
    difference = (got - expected).abs().max().item()
    assert scale > 0, f"{what} is zero: the comparison would prove nothing"
    assert difference <= 1e-5 * scale, f"{what}: max difference {difference} at scale {scale}"


@pytest.mark.parametrize("with_given", [False, True])
def test_a_pack_gives_each_sample_its_own_velocity_and_gradients(with_given):
    model = perturbed_tiny_dit(IN_CHANNELS, TEXT_DIM)
    inputs = pack(with_given)
    x, t, targets = inputs["x0"], per_frame_times(inputs), inputs["noise"]

    def loss(velocities):
        return sum(
            (v - target).square().mean() for v, target in zip(velocities, targets, strict=True)
        )

    args = (inputs["text"], inputs["mask"], grouped(inputs["given"]))
    packed_groups = model(
        grouped(x), grouped(t), *args, **inputs["micro"], sequence_length=SEQUENCE_LENGTH
    )
    packed = [sample for group in packed_groups for sample in group]
    packed_grads = gradients(model, loss(packed))

    alone = []
    for i in range(len(SHAPES)):
        one = sample(inputs, i)
        args = (one["text"], one["mask"], one["given"])
        alone.append(model(one["x0"], t[i][None], *args, **one["micro"])[0])
    alone_grads = gradients(model, loss(alone))

    for i, (got, expected) in enumerate(zip(packed, alone, strict=True)):
        assert got.shape == x[i].shape
        assert_relatively_close(got, expected, f"velocity of sample {i} {SHAPES[i]}")
    assert packed_grads.keys() == alone_grads.keys()
    assert ("given_embed" in alone_grads) == with_given
    for name, expected in alone_grads.items():
        assert_relatively_close(packed_grads[name], expected, f"gradient of {name}")


def test_packed_training_loss_is_each_samples_own():
    """Given frames sit at time 0 and leave the weighted mean, as in each sample's dense loss."""
    model = perturbed_tiny_dit(IN_CHANNELS, TEXT_DIM)
    inputs = pack(with_given=True)

    def run(inputs: dict, **model_kwargs) -> torch.Tensor:
        return training_loss(
            model,
            inputs["x0"],
            inputs["text"],
            inputs["mask"],
            inputs["t"],
            inputs["noise"],
            inputs["frame_weight"],
            inputs["given"],
            model_kwargs=inputs["micro"] | model_kwargs,
        )

    groups = {name: grouped(inputs[name]) for name in ("x0", "noise", "frame_weight", "given")}
    packed = run(inputs | groups, sequence_length=SEQUENCE_LENGTH)
    packed_grads = gradients(model, packed.sum())
    alone = torch.cat([run(sample(inputs, i)) for i in range(len(SHAPES))])
    alone_grads = gradients(model, alone.sum())

    assert packed.shape == (len(SHAPES),)
    assert_relatively_close(packed, alone, "per-sample losses")
    for name, expected in alone_grads.items():
        assert_relatively_close(packed_grads[name], expected, f"gradient of {name}")


def test_activation_checkpointing_recomputes_a_pack_to_the_same_gradients():
    """The blocks' layout (rows, segments, rotary tables) passes through the recomputation."""
    inputs = pack(with_given=True)
    grads = []
    for checkpointed in (False, True):
        model = perturbed_tiny_dit(IN_CHANNELS, TEXT_DIM)
        if checkpointed:
            apply_activation_checkpointing(model, every=1)
        loss = training_loss(
            model,
            grouped(inputs["x0"]),
            inputs["text"],
            inputs["mask"],
            inputs["t"],
            grouped(inputs["noise"]),
            given=grouped(inputs["given"]),
            model_kwargs=inputs["micro"] | {"sequence_length": SEQUENCE_LENGTH},
        )
        grads.append(gradients(model, loss.sum()))
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys()
    for name, expected in plain.items():
        assert_relatively_close(recomputed[name], expected, f"gradient of {name}")


def test_segment_attention_is_a_block_diagonal_mask():
    torch.manual_seed(0)
    lengths = [3, 7, 7, 1, 5, 5, 5]  # runs of equal lengths attend in one batched call
    q, k, v = (torch.randn(1, sum(lengths), 2, 8) for _ in range(3))
    segment_of = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))
    block_diagonal = segment_of[:, None] == segment_of[None, :]
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=block_diagonal
    ).transpose(1, 2)
    segments = Segments.from_lengths(lengths)
    assert segments.cu_seqlens.tolist() == [0, 3, 10, 17, 18, 23, 28, 33]
    assert segments.max_seqlen == 7
    torch.testing.assert_close(attention(q, k, v, segments=segments), expected)
    with pytest.raises(ValueError, match="segments of 33 tokens need one packed sequence"):
        attention(q[:, :32], k[:, :32], v[:, :32], segments=segments)

    # Padding after the segments attends to nothing and changes nothing before it.
    padded = Segments.from_lengths(lengths, padding=4)
    q, k, v = (torch.cat([x, torch.randn(1, 4, 2, 8)], dim=1) for x in (q, k, v))
    out = attention(q, k, v, segments=padded)
    torch.testing.assert_close(out[:, :33], expected)
    assert not out[:, 33:].any()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sequence_length": 60}, "sequence_length=60 is less than the 82 tokens"),
        ({"t": [torch.tensor([0.5])] * 3}, "one t .* per group, got 4 x, 3 t"),
        (
            {"t": [torch.tensor([0.5])] * 4},
            r"t\[2\] must be \(B,\) = \(2,\) or \(B, T\) = \(2, 2\)",
        ),
        (
            {"given": [torch.zeros(1, 3, dtype=torch.bool)] * 4},
            r"given\[0\] must be bool .* \(1, 1\)",
        ),
        (
            {"x": [torch.zeros(1, 4, 1, 2, 2)] * 2 + [torch.zeros(1, 3, 1, 2, 2)] * 2},
            r"x\[2\] must be",
        ),
        ({"x": [torch.zeros(4, 1, 2, 2)] * 4}, r"x\[0\] must be a group of latents \(B, C=4"),
        ({"fps": torch.ones(3)}, r"fps must be \(B,\) = \(5,\)"),
        ({"x": torch.zeros(4, IN_CHANNELS, 1, 2, 2)}, "sequence_length pads a packed batch"),
    ],
)
def test_bad_packed_inputs_are_named(change, message):
    model = perturbed_tiny_dit(IN_CHANNELS, TEXT_DIM)
    inputs = pack(with_given=False)
    call = {
        "x": grouped(inputs["x0"]),
        "t": grouped(list(inputs["t"])),
        "text": inputs["text"],
        "text_mask": inputs["mask"],
        "given": None,
        **inputs["micro"],
        "sequence_length": SEQUENCE_LENGTH,
    } | change
    with pytest.raises(ValueError, match=message):
        model(**call)
