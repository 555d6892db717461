"""nsa_attention's Triton kernels (compressed, selection, selected; under TRITON_INTERPRET=1
on the CPU) against the float64 reference: the rule on the output and every gradient, the
selection block for block. Sizes stay small for the interpreter; block size 16, lengths that
are not multiples of it. Every test runs the selected branch both ways (selected.py):
query-major and block-major, whatever the group size."""

from __future__ import annotations

import pytest
import torch

from gatedfwa.ops.backend import use_backend
from gatedfwa.ops.nsa import launch, nsa_attention, selected_block_major


# launch.TUNING's block_major_max_group per strategy: no group block-major, every group block-major.
STRATEGIES = {"query-major": 0, "block-major": 1 << 20}


@pytest.fixture(autouse=True, params=list(STRATEGIES))
def triton_backend(monkeypatch, override_tuning, request):
    """Force the Triton kernels and the selected branch's strategy, and poison the buffers
    they write with NaN."""
    override_tuning(launch.TUNING, block_major_max_group=STRATEGIES[request.param])
    monkeypatch.setattr(launch, "allocate_like", lambda x: torch.full_like(x, float("nan")))
    monkeypatch.setattr(launch, "allocate_indices", lambda shape, device: torch.full(
        shape, -7, dtype=torch.int32, device=device))
    with use_backend("triton"):
        yield


# (batch, seqlen, q heads, kv heads, head dim, block counts, dtype): GQA groups 1, 2, 4 and 16,
# head dims 24 and 80 (not powers of two), every dtype; a group of 3 (padded to 4 rows).
CASES = [
    (2, 70, 2, 2, 24, 3, torch.float32),
    (1, 83, 4, 2, 80, 4, torch.bfloat16),
    (1, 75, 4, 1, 32, 5, torch.float16),
    (1, 50, 16, 1, 16, 3, torch.float32),
    (1, 40, 6, 2, 16, 2, torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-HQ{}-H{}-D{}-S{}-{}".format(*c[:6], str(c[6])[6:]))
def test_triton_kernels(device, case, make_inputs, check_nsa):
    batch, seqlen, q_heads, kv_heads, head_dim, block_counts, dtype = case
    q, k, v, gates = make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, dtype, device, branches=("cmp", "slc"))
    check_nsa(q, k, v, gates, block_counts=block_counts)


@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (3, 1)], ids=lambda h: "HQ{}-H{}".format(*h))
def test_triton_varlen_with_sliding_branch(device, heads, make_inputs, check_nsa):
    """Empty, short (no complete block) and long sequences packed; all three branches; groups
    2, 1 and 3."""
    cu_seqlens = torch.tensor([0, 0, 11, 60, 61, 120], dtype=torch.int32, device=device)
    q, k, v, gates = make_inputs(1, 120, *heads, 16, torch.float32, device)
    check_nsa(q, k, v, gates, block_counts=3, window_size=12, cu_seqlens=cu_seqlens)


def test_triton_block_larger_than_tile(device, make_inputs, check_nsa):
    """A block of 40 keys spans several key tiles (16 wide) of the selected kernels."""
    q, k, v, gates = make_inputs(1, 130, 2, 1, 16, torch.float32, device, branches=("cmp", "slc"), block_size=40)
    check_nsa(q, k, v, gates, block_size=40, block_counts=2)


def test_triton_given_block_indices(device, make_inputs, check_nsa):
    q, k, v, gates = make_inputs(1, 64, 4, 2, 24, torch.float32, device, branches=("slc",))
    t = torch.arange(64, device=device)
    own = (t // 16)[None, :, None].expand(1, 64, 2)
    previous = torch.where(own > 1, own - 1, -1)
    chosen = torch.stack([own, torch.full_like(own, -1), previous], dim=-1)
    _, _, indices = check_nsa(q, k, v, gates, block_indices=chosen)
    assert (indices[..., 0] <= indices[..., 1]).logical_or(indices[..., 1] == -1).all()


@pytest.mark.parametrize("heads", [(1, 1), (3, 1)], ids=lambda h: "HQ{}-H{}".format(*h))
def test_triton_queries_without_blocks(device, heads, make_inputs, check_nsa):
    """Queries whose given lists are all -1 get o_slc = 0 and no gradient from it, beside
    queries that select blocks; groups 1 and 3."""
    q, k, v, gates = make_inputs(1, 50, *heads, 16, torch.float32, device, branches=("slc",))
    t = torch.arange(50, device=device)[None, :, None]
    own = (t // 16).expand(1, 50, heads[1])
    chosen = torch.stack([torch.where(own > 0, 0, -1), own], dim=-1)
    chosen[:, 20:30] = -1
    check_nsa(q, k, v, gates, block_indices=chosen)


# (batch, seqlen, q heads, kv heads, varlen, head dim): groups 16, 1, 4, 2 and 3 at the
# benchmark's head size, block size and block count, and D = 256 (the largest head the ops
# take, whose tiles the launch rules shrink) at groups 4 and 1; compiled kernels with their
# real tiles.
GPU_CASES = [
    (1, 2048, 16, 1, False, 128),
    (2, 1500, 4, 4, False, 128),
    (1, 3000, 8, 2, True, 128),
    (1, 2048, 8, 4, False, 128),
    (1, 2048, 12, 4, True, 128),
    (1, 1536, 8, 2, False, 256),
    (2, 1024, 2, 2, True, 256),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the compiled kernels with their real tile sizes")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}-T{}-HQ{}-H{}-varlen{}-D{}".format(*c))
def test_gpu_bf16_moderate_size(case, make_inputs, check_nsa):
    batch, seqlen, q_heads, kv_heads, varlen, head_dim = case
    if varlen:
        batch = 1
    q, k, v, gates = make_inputs(batch, seqlen, q_heads, kv_heads, head_dim, torch.bfloat16, "cuda", block_size=64)
    cu_seqlens = torch.tensor([0, 700, 701, min(2100, seqlen - 1), seqlen], dtype=torch.int32,
                              device="cuda") if varlen else None
    # bf16 summaries move near-tied importances; the selection is compared where it is clear.
    check_nsa(q, k, v, gates, block_size=64, block_counts=16, window_size=512, cu_seqlens=cu_seqlens,
              min_checked=0.5)


def test_custom_ops_opcheck(device):
    """The compressed and selected branches' custom ops (triton_path.py): schemas, fake
    tensors and autograd registrations, packed sequences; the selected branch with the
    inverted selection given (block-major) and built inside."""
    from gatedfwa.ops.nsa import triton_path
    from gatedfwa.ops.nsa.layout import SequenceLayout
    from gatedfwa.ops.nsa.pooling import pool_block_summaries

    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    cu_seqlens = torch.tensor([0, 19, 40], dtype=torch.int32, device=device)
    q = torch.randn(1, 40, 4, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 40, 2, 16, device=device, requires_grad=True) for _ in range(2))
    layout = SequenceLayout(q, 2, 8, cu_seqlens)
    k_cmp, v_cmp = (pool_block_summaries(x, layout).detach().requires_grad_() for x in (k, v))
    torch.library.opcheck(triton_path._compressed.op, (q, k_cmp, v_cmp, *layout.op_args(), 0.25), test_utils=utils)
    # Each query keeps block 0 and its own block (ascending, -1 where they coincide).
    position = torch.cat([torch.arange(19), torch.arange(21)]).to(device)
    own = position // 8
    indices = torch.stack([torch.zeros_like(own), torch.where(own > 0, own, -1)], -1).to(torch.int32)
    indices = indices[None, :, None, :].expand(1, 40, 2, 2).contiguous()
    inverted = tuple(selected_block_major.invert_selection(indices, layout))
    for given in (inverted, (None, None, None)):
        torch.library.opcheck(triton_path._selected.op, (q, k, v, indices, cu_seqlens, None, layout.max_seqlen,
                                                         layout.max_seqlen_q, 8, 0.25, *given), test_utils=utils)


def test_compiles_fullgraph(device, make_inputs):
    """Without packed sequences the Triton path is one graph under torch.compile(fullgraph=True):
    its kernels are custom ops (aot_eager: dynamo capture and AOT autograd, no code generated);
    loss and gradients as in eager mode."""
    torch._dynamo.reset()
    q, k, v, gates = make_inputs(1, 40, 4, 2, 16, torch.float32, device)

    def loss(q, k, v, g):
        o = nsa_attention(q, k, v, g, gates["g_cmp"], gates["g_slc"], gates["g_swa"], block_size=16, block_counts=2,
                          window_size=12)
        return o.square().mean()

    def loss_and_grads(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, gates["g"])]
        value = fn(*leaves)
        return [value.detach(), *torch.autograd.grad(value, leaves)]

    compiled = loss_and_grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for name, a, b in zip(("loss", "dq", "dk", "dv", "dg"), compiled, loss_and_grads(loss)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_selected_backward_work_items_cover_each_list_once(override_tuning):
    """The dk/dv work items: every entry of every block list in exactly one item, each item
    inside one list and at most a chunk long, empty lists without items."""
    from gatedfwa.ops.nsa.layout import SequenceLayout

    # 20 rows per item, group 4: chunks of 5 queries.
    override_tuning(launch.TUNING, rules={"work_items": lambda arch, **keys: dict(ROWS_PER_ITEM=20)})
    q, k = torch.zeros(1, 64, 4, 16), torch.zeros(1, 64, 1, 16)
    layout = SequenceLayout(q, k.shape[2], 16, None)
    counts = torch.randint(0, 13, (layout.max_blocks,))
    counts[1] = 0
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    list_id, start, end = selected_block_major.work_items(offsets, layout)
    covered = torch.zeros(int(offsets[-1]), dtype=torch.int64)
    for lid, a, b in zip(list_id.tolist(), start.tolist(), end.tolist()):
        assert offsets[lid] <= a < b <= offsets[lid + 1] and b - a <= 5
        covered[a:b] += 1
    assert torch.equal(covered, torch.ones_like(covered))
    assert 1 not in list_id.tolist()


def test_invert_selection_lists_every_choice_once():
    """Packed sequences, -1 slots: the list of (sequence, kv head, block) holds exactly the
    queries that chose that block, ascending, and each entry knows its kv head."""
    from gatedfwa.ops.nsa.layout import SequenceLayout

    cu_seqlens = torch.tensor([0, 5, 5, 40], dtype=torch.int32)
    q, k = torch.zeros(1, 40, 6, 16), torch.zeros(1, 40, 3, 16)
    layout = SequenceLayout(q, k.shape[2], 8, cu_seqlens)
    distinct = torch.rand(1, 40, 3, layout.max_blocks).argsort(-1)[..., :4].to(torch.int32)  # no repeats
    indices = torch.where(torch.rand(distinct.shape) < 0.3, -1, distinct)
    inverted = selected_block_major.invert_selection(indices, layout)
    sequence = layout.sequence_ids()
    for seq in range(layout.num_seqs):
        for head in range(3):
            for block in range(layout.max_blocks):
                lid = (seq * 3 + head) * layout.max_blocks + block
                a, b = inverted.offsets[lid].item(), inverted.offsets[lid + 1].item()
                expected = [t for t in range(40) if sequence[t] == seq and block in indices[0, t, head].tolist()]
                assert inverted.queries[a:b].tolist() == expected
                assert (inverted.kv_heads[a:b] == head).all()
    assert inverted.entries == int((indices >= 0).sum())


@pytest.mark.parametrize("rule, match", [
    (dict(ROWS=24, BLOCK_C=16), "ROWS must be whole groups"),  # group 16: 24 rows is a group and a half
    (dict(ROWS=48, BLOCK_C=16), "ROWS must be a power of two"),
    (dict(ROWS=64, BLOCK_C=24), "must be a power of two of at least 16"),
])
def test_kernels_refuse_tiles_that_break_their_invariants(override_tuning, rule, match):
    """A launch.TUNING rule whose tiles break the kernels' layout (tiles.check_tiles) fails
    when the kernel is built, naming the invariant, instead of computing with torn groups."""
    from gatedfwa.ops.nsa.compressed import compressed_forward
    from gatedfwa.ops.nsa.layout import SequenceLayout

    override_tuning(launch.TUNING, rules={"compressed": lambda arch, **keys: dict(rule, num_warps=4, num_stages=1)})
    q = torch.randn(1, 32, 16, 16)
    k_cmp = torch.randn(2, 1, 16)
    with pytest.raises(Exception, match=match):
        compressed_forward(q, k_cmp, k_cmp, SequenceLayout(q, 1, 16, None), 0.25)
