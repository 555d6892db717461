"""A decode step never waits for the device: nothing in it reads a tensor's value on the
host (.item(), bool(t), int(t), .tolist(), .cpu(), nonzero, boolean-mask indexing, a Python
branch on a tensor value). On a GPU each such read stalls the launch queue until the device
has caught up, which at batch 1 costs more than the step's work.

The prompt is prefilled on the CPU (prefill may read values); then the model and its cache
move to the "meta" device, where tensors have shapes but no data, and the decode steps run
there under a dispatch mode that rejects the ops a host read dispatches to. On meta a read
that bypasses the dispatcher (.tolist(), .cpu()) fails as well. With backend "triton" the
host side of the Triton path runs, its kernel launches replaced by no-ops."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gatedfwa.models import GatedFWAForCausalLM
from gatedfwa.ops import use_backend
from gatedfwa.testing import op_modules, output_cache
from tests.models.test_model import tiny_config

# What .item(), bool(t), int(t) and data-dependent shapes dispatch to.
HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
              "aten::nonzero_static", "aten::masked_select"}


class HostReadError(AssertionError):
    pass


class RejectHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in HOST_READS:
            raise HostReadError(f"{func} reads a tensor value on the host during a decode step")
        if func._schema.name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            raise HostReadError("boolean-mask indexing sizes its output from tensor values")
        return func(*args, **(kwargs or {}))


class NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_triton_kernels(monkeypatch):
    from triton.runtime import KernelInterface

    modules = op_modules()
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, KernelInterface):
                monkeypatch.setattr(module, name, NoLaunch())


def move_cache(cache, device):
    for layer in cache:
        for name in ("keys", "values", "decays", "positions", "token_counts", "split_counters"):
            if getattr(layer, name) is not None:
                setattr(layer, name, getattr(layer, name).to(device))
        layer.extra_state = {k: v.to(device) for k, v in layer.extra_state.items()}


def test_the_detector_catches_host_reads():
    x = torch.ones(3, device="meta")
    for read in (lambda: x.sum().item(), lambda: bool(x.all()), lambda: x.nonzero(), lambda: x[x > 0]):
        with pytest.raises(HostReadError), RejectHostReads():
            read()
    for read in (lambda: x.tolist(), lambda: x.cpu()):
        with pytest.raises((NotImplementedError, RuntimeError)), RejectHostReads():
            read()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("overrides", [
    dict(attention_kinds="gatedfwa"),
    dict(attention_kinds="swa", num_key_value_heads=1, token_shift=True),
    dict(attention_kinds="full", output_gate=True, qk_norm=True),
    dict(attention_kinds="forgetting", num_key_value_heads=4, token_shift=True, output_gate=True),
    dict(attention_kinds=["gatedfwa", "full"], token_shift=True, output_gate=True, qk_norm=True),
], ids=["gatedfwa-gqa", "swa-mqa-shift", "full-outgate-qknorm", "forgetting-mha-shift-outgate", "hybrid-all"])
def test_decode_steps_never_read_device_values(overrides, backend, monkeypatch):
    model = GatedFWAForCausalLM(tiny_config(**overrides)).eval()
    prompt = torch.randint(1, 61, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding: the prefill packs, the cache marks padding slots
    with torch.no_grad(), use_backend("torch"):
        out = model(prompt, attention_mask=mask, use_cache=True)
    cache = output_cache(out)

    model.to("meta")
    move_cache(cache, "meta")
    if backend == "triton":
        stub_triton_kernels(monkeypatch)
    next_ids = torch.zeros(2, 1, dtype=torch.long, device="meta")
    stream_mask = torch.ones(2, 6, dtype=torch.long, device="meta")
    with torch.no_grad(), use_backend(backend), RejectHostReads():
        # As generate() calls it (whole-stream mask), then the manual loop (no mask), then
        # three tokens in one step (speculative or chunked decoding); past the window of 4.
        for _ in range(3):
            stream_mask = torch.cat((stream_mask, stream_mask[:, :1]), dim=1)
            out = model(next_ids, attention_mask=stream_mask, cache=cache, logits_to_keep=1)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(3):
            out = model(next_ids, cache=cache, logits_to_keep=1)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        model(torch.zeros(2, 3, dtype=torch.long, device="meta"), cache=cache)
    assert cache.get_seq_length() == 6 + 6 + 3
