"""NVILA's token-merging projectors: channel order, padding, key names, the repeated-scale input."""

import pytest
import torch

from models.projector import MLPDownsampleProjector, TokenMerge


def numbered_grid(rows: int, cols: int) -> torch.Tensor:
    """(1, rows*cols, 1) tokens; token (r, c) holds r * cols + c."""
    return torch.arange(float(rows * cols)).view(1, rows * cols, 1)


def test_2x2_merge_uses_nvila_channel_order():
    merged = TokenMerge((4, 4), 2)(numbered_grid(4, 4))
    assert merged.shape == (1, 4, 4)
    # token (0, 0) = [x(0,0), x(0,1), x(1,0), x(1,1)]; token (0, 1) = [x(0,2), x(0,3), x(1,2), x(1,3)]
    assert merged[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_2x2_merge_puts_channels_fastest_unlike_pixel_unshuffle():
    tokens = torch.cat([numbered_grid(4, 4), 100 + numbered_grid(4, 4)], dim=2)  # two channels
    merged = TokenMerge((4, 4), 2)(tokens)[0, 0]
    assert merged.tolist() == [0, 100, 1, 101, 4, 104, 5, 105]
    unshuffled = torch.nn.functional.pixel_unshuffle(tokens.view(1, 4, 4, 2).permute(0, 3, 1, 2), 2)[0, :, 0, 0]
    assert unshuffled.tolist() == [0, 1, 4, 5, 100, 101, 104, 105]


def test_3x3_merge_pads_a_grid_that_is_not_a_multiple_of_three_with_zeros():
    merged = TokenMerge((4, 4), 3)(numbered_grid(4, 4) + 1)  # +1 so real tokens are non-zero
    assert merged.shape == (1, 4, 9)
    assert merged[0, 0].tolist() == [1, 2, 3, 5, 6, 7, 9, 10, 11]
    assert merged[0, 1].tolist() == [4, 0, 0, 8, 0, 0, 12, 0, 0]
    assert merged[0, 3].tolist() == [16, 0, 0, 0, 0, 0, 0, 0, 0]


def test_odd_grid_is_padded_for_the_2x2_merge_as_nvila_does():
    merged = TokenMerge((3, 3), 2)(numbered_grid(3, 3) + 1)
    assert merged.shape == (1, 4, 4)
    assert merged[0, 1].tolist() == [3, 0, 6, 0]


@pytest.mark.parametrize(
    ("projector_type", "keys", "tokens"),
    [
        ("mlp_downsample", ["layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias",
                            "layers.4.weight", "layers.4.bias"], 4),
        ("mlp_downsample_3x3_fix", ["layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias",
                                    "layers.4.weight", "layers.4.bias", "layers.5.weight", "layers.5.bias",
                                    "layers.7.weight", "layers.7.bias"], 4),
    ],
)
def test_projector_state_dict_uses_nvila_key_names(projector_type, keys, tokens):
    projector = MLPDownsampleProjector((4, 4), 8, 12, projector_type)
    assert list(projector.state_dict()) == keys
    assert projector.tokens_per_image == tokens
    assert projector(torch.randn(2, 16, 8)).shape == (2, tokens, 12)


def test_3x3_projector_layer_shapes_follow_nvila_lite():
    projector = MLPDownsampleProjector((6, 6), 8, 12, "mlp_downsample_3x3_fix")
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items() if k.endswith("weight")}
    assert shapes == {"layers.1.weight": (72,), "layers.2.weight": (24, 72), "layers.4.weight": (24,),
                      "layers.5.weight": (12, 24), "layers.7.weight": (12, 12)}


def test_repeated_scales_feed_the_same_features_to_every_scale_slot():
    torch.manual_seed(0)
    projector = MLPDownsampleProjector((2, 2), 4, 6, scales=3)
    tokens = torch.randn(1, 4, 4)
    assert projector.layers[1].normalized_shape == (4 * 12,)
    merged = projector.layers[0](tokens.repeat(1, 1, 3))
    expected = projector.layers[1:](merged)
    torch.testing.assert_close(projector(tokens), expected)
    assert merged[0, 0, :12].tolist() == tokens[0, 0].repeat(3).tolist()


def test_unknown_projector_type_is_a_clear_error():
    with pytest.raises(ValueError, match="projector type 'mlp2x_gelu'"):
        MLPDownsampleProjector((4, 4), 8, 12, "mlp2x_gelu")
