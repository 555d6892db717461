"""gatedfwa_mask: transformers' masks read as sequences + window, or refused."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import (
    and_masks,
    bidirectional_mask_function,
    causal_mask_function,
    chunked_causal_mask_function,
    packed_sequence_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from gatedfwa.integrations.transformers_masks import (
    UnsupportedMaskError,
    WindowMaskLayout,
    gatedfwa_mask,
    layout_from_dense_mask,
)


def window_function(window):
    return causal_mask_function if window is None else sliding_window_causal_mask_function(window)


@pytest.mark.parametrize("window", [None, 1, 3, 50])
def test_fast_path_agrees_with_dense_path(window):
    """Without padding or packing transformers allows the causal shortcut; the layout it
    gives must describe the same attention as reading the full mask."""
    args = dict(batch_size=2, q_length=11, kv_length=11, mask_function=window_function(window), local_size=window)
    fast = gatedfwa_mask(**args, allow_is_causal_skip=True)
    dense = gatedfwa_mask(**args, allow_is_causal_skip=False)
    assert isinstance(fast, WindowMaskLayout) and isinstance(dense, WindowMaskLayout)
    assert fast.cu_seqlens is None and fast.token_index is None and dense.token_index is None
    assert fast.effective_window(fast.window_size) == dense.effective_window(dense.window_size)
    if window == 1:  # every token its own sequence: the same attention, another description
        assert dense.cu_seqlens.tolist() == list(range(0, 23))
    else:
        assert dense.cu_seqlens is None


def test_chunked_attention_is_read_as_sequences():
    """Chunked masks (Llama 4) come with local_size = chunk size, like sliding windows: the
    probe must not take them for a window of 4. Read whole, they are causal attention
    within chunks, which the op computes exactly as one sequence per chunk."""
    function = chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long))
    layout = gatedfwa_mask(batch_size=2, q_length=11, kv_length=11, mask_function=function, local_size=4)
    assert layout.window_size is None and layout.max_seqlen == 4
    assert layout.cu_seqlens.tolist() == [0, 4, 8, 11, 15, 19, 22]


def test_bidirectional_attention_is_refused():
    with pytest.raises(UnsupportedMaskError):
        gatedfwa_mask(batch_size=1, q_length=6, kv_length=6, mask_function=bidirectional_mask_function,
                      allow_is_causal_skip=False)


def test_padding_and_packing_give_the_sequences():
    """Row 0: left padding 2 then sequences of 3 and 4 (packed); row 1: 6 tokens then right
    padding 3. Window 2."""
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    sequence_ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    function = and_masks(sliding_window_causal_mask_function(2), packed_sequence_mask_function(sequence_ids))
    layout = gatedfwa_mask(batch_size=2, q_length=9, kv_length=9, mask_function=function,
                           attention_mask=padding, local_size=2, allow_is_causal_skip=False)
    assert layout.window_size == 2 and layout.max_seqlen == 6
    assert layout.cu_seqlens.tolist() == [0, 3, 7, 13]
    assert layout.token_index.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]


def test_random_layouts_are_read_back(device):
    """Random sequence lengths, padding at both ends, random windows: the layout holds the
    sequences that were packed, and the mask it rebuilds is the mask given."""
    for _ in range(20):
        batch, seqlen = 3, 17
        window = [None, 1, 2, 5, 40][int(torch.randint(0, 5, ()))]
        real = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
        sequence_ids = torch.full((batch, seqlen), -1, device=device)
        lengths = []
        next_id = 0
        for b in range(batch):
            left, right = (int(x) for x in torch.randint(0, 4, (2,)))
            t = left
            while t < seqlen - right:
                n = min(int(torch.randint(1, 7, ())), seqlen - right - t)
                sequence_ids[b, t:t + n] = next_id
                real[b, t:t + n] = True
                lengths.append(n)
                next_id += 1
                t += n
        function = and_masks(window_function(window), packed_sequence_mask_function(sequence_ids))
        dense = sdpa_mask(batch_size=batch, q_length=seqlen, kv_length=seqlen, mask_function=function,
                          attention_mask=real, allow_is_causal_skip=False, device=device)[:, 0]
        layout = layout_from_dense_mask(dense, real)
        if layout.cu_seqlens is not None:
            got = layout.cu_seqlens.diff().tolist()
            # A window of 1 makes neighbouring tokens indistinguishable from separate sequences.
            assert got == lengths or (window == 1 and got == [1] * sum(lengths))
        else:
            assert lengths == [seqlen] * batch
        expected_window = max(lengths) if window is None else min(window, max(lengths))
        assert layout.effective_window(layout.window_size) == expected_window or window == 1


def test_decoding_shapes_get_the_sdpa_mask():
    """Fewer queries than keys (a decoding step): the same boolean mask as sdpa's."""
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    args = dict(batch_size=2, q_length=1, kv_length=7, q_offset=6, kv_offset=0,
                mask_function=sliding_window_causal_mask_function(3), attention_mask=padding, local_size=3)
    got = gatedfwa_mask(**args)
    expected = sdpa_mask(**args, allow_is_causal_skip=False)
    assert isinstance(got, torch.Tensor) and torch.equal(got, expected)
    assert got[:, 0, 0].tolist() == [[False, False, False, False, True, True, True]] * 2
