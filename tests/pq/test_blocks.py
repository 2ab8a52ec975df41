"""Weight <-> sub-vectors per layer type (pq/blocks.py): fairseq's default block sizes, rows cut
into contiguous blocks (conv: the flattened in x kh x kw dimension), clear errors."""
import pytest
import torch
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.pq.blocks import block_kind, check_block_size, default_block_size, from_blocks, to_blocks


@pytest.mark.parametrize("layer, kind, d", [
    (nn.Linear(16, 4), "linear", 8), (nn.Embedding(5, 16), "embedding", 8),
    (nn.Conv2d(8, 4, 1), "conv1x1", 4), (nn.Conv2d(8, 4, 3), "conv", 9), (nn.Conv2d(8, 4, (3, 5)), "conv", 15),
    (nn.Conv1d(8, 4, 3), "conv", 3), (nn.Conv1d(8, 4, 1), "conv1x1", 4)])
def test_default_block_sizes(layer, kind, d):
    assert block_kind(layer) == kind and default_block_size(layer) == d


@pytest.mark.parametrize("layer, d", [(nn.Linear(16, 3), 8), (nn.Conv2d(4, 2, 3), 9), (nn.Conv2d(8, 2, 1), 4),
                                      (nn.Conv1d(4, 2, 3), 6), (nn.Embedding(3, 16), 8)])
def test_blocks_are_contiguous_pieces_of_each_row(layer, d):
    w = layer.weight.detach()
    b = to_blocks(w, d)
    rows = w.reshape(w.shape[0], -1)
    per_row = rows.shape[1] // d
    for i in (0, b.shape[0] - 1):
        o, j = divmod(i, per_row)
        assert torch.equal(b[i], rows[o, j * d:(j + 1) * d])
    assert torch.equal(from_blocks(b, w.shape), w)


def test_a_block_size_that_does_not_divide_names_the_layer_and_the_sizes_that_would():
    with pytest.raises(ConfigError, match=r"layer 'fc' \(Linear, weight \[4, 10\]\): block_size 8 does not divide "
                                          r"its in_features 10; block sizes that would: \[1, 2, 5, 10\]"):
        check_block_size("fc", nn.Linear(10, 4), nn.Linear(10, 4).weight, 8)
    conv = nn.Conv2d(2, 4, 3)
    with pytest.raises(ConfigError, match=r"in_channels/groups x kernel elements 18; .*\[1, 2, 3, 6, 9, 18\]"):
        check_block_size("conv", conv, conv.weight, 4)


def test_unsupported_layer():
    with pytest.raises(ConfigError, match="not LSTM"):
        block_kind(nn.LSTM(4, 4))
