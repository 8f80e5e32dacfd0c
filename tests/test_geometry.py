"""The latent geometry: pixel sizes to latents to DiT tokens, and the sizes that do not fit."""

import pytest

from model.geometry import LatentGeometry, token_grid

GEOMETRY = LatentGeometry(temporal_compression=4, spatial_compression=8, patch=(1, 2, 2))


def test_a_clip_becomes_latents_and_tokens():
    assert GEOMETRY.latent_shape(17, 64, 96) == (5, 8, 12)
    assert GEOMETRY.tokens(17, 64, 96) == 5 * 4 * 6
    assert GEOMETRY.tokens(1, 64, 64) == 16  # an image is one latent frame
    assert GEOMETRY.latent_tokens((5, 8, 12)) == 120
    assert [GEOMETRY.latent_frames(n) for n in (1, 5, 17)] == [1, 2, 5]
    assert [GEOMETRY.pixel_frames(n) for n in (1, 2, 5)] == [1, 5, 17]


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((8, 64, 64), r"frames must be 1 \+ k\*4 \(temporal compression\)"),
        ((0, 64, 64), r"frames must be 1 \+ k\*4"),
        ((1, 64, 72), r"multiples of 16 and 16 \(compression x patch\)"),
        ((1, 0, 64), r"height and width must be multiples"),
    ],
)
def test_sizes_that_do_not_fit_are_refused(size, message):
    with pytest.raises(ValueError, match=message):
        GEOMETRY.latent_shape(*size)


def test_the_temporal_patch_must_divide_the_latent_frames():
    with pytest.raises(ValueError, match="latent length divisible by the patch 2"):
        LatentGeometry(4, 8, (2, 2, 2)).tokens(17, 64, 64)  # 5 latent frames
    assert LatentGeometry(4, 8, (2, 2, 2)).tokens(13, 64, 64) == 2 * 4 * 4
    with pytest.raises(ValueError, match=r"\(T, H, W\) = \(3, 7, 6\) must be divisible"):
        token_grid((3, 7, 6), (1, 2, 2))
