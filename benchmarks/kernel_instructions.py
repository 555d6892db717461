"""What the gate costs inside the attention kernels' loops, read from the machine code.

Compiles the forward, dq and dk/dv kernels for an H100/H200 (sm_90) on any machine that has
Triton (no GPU needed: Triton ships ptxas and nvdisasm), with and without a gate, and counts
the SASS instructions in each loop body, by kind. The loops are the tile loops of
the window attention kernels (gatedfwa/ops/window_attention/): the largest one with fewer float selects (FSEL) than scores per thread is the
unmasked loop that dominates long windows (a masked tile selects every score); the others
handle the diagonal and the window's far edge (paired across the two variants by size).

    python benchmarks/kernel_instructions.py --out benchmarks/results    # about a minute
    python benchmarks/kernel_instructions.py --head-dim 64 --out /tmp     # another head size

Writes kernel_instructions.json/.md. Instruction counts are not time (the loops also wait on
memory and tensor cores), but they show where per-element work was added: each thread holds
32 scores of a 64 x 64 tile, so one extra operation per score is 32 instructions.

The kernels are specialised as at the benchmark size (B=4, T=8192, H=16, D=128 or --head-dim,
bf16): every pointer and integer argument divisible by 16, as Triton's launcher would find
them, and the tile sizes launch.py picks for that head size.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  (the commit measured: git's HEAD, clean tree)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from common import environment, write_results  # noqa: E402
from gatedfwa.ops.window_attention import backward, forward, launch  # noqa: E402

TARGET = GPUTarget("cuda", 90, 64)
# Opcode groups for the table.
KINDS = {
    "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP"),
    "exp2": ("MUFU",),
    "tensor core": ("HGMMA", "WARPGROUP"),
    "memory": ("LDG", "LDGSTS", "LDS", "STS", "LDL", "STL", "LDSM", "STG"),
    "integer/address": ("IMAD", "LEA", "IADD3", "VIADD", "ISETP", "SEL", "LOP3", "SHF", "UIADD3", "UIMAD"),
}
# The kernels and what differs between them: pointer arguments (all else is int32 unless listed
# as float), scale arguments, and the launch configuration for D = 128.
KERNELS = {
    "forward": (forward._forward_kernel, ("qk_scale",)),
    "dq": (backward._dq_kernel, ("qk_scale", "scale")),
    "dkdv": (backward._dkdv_kernel, ("qk_scale", "scale")),
}
ARCH = "sm90"  # the launch choices of launch.TUNING for an H100/H200
LOW_PRECISION_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "CU_SEQLENS"}


def _nvdisasm() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def compile_sass(kernel, floats, config: dict, has_gate: bool, head_dim: int) -> str:
    """SASS text of one kernel specialised for head_dim (a power of two), bf16, sm_90."""
    constants = dict(GROUP=1, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=config["BLOCK_M"],
                     BLOCK_N=config["BLOCK_N"], GATE_CHUNK=launch.gate_chunk_on(head_dim, ARCH),
                     HAS_GATE=has_gate, VARLEN=False, DOT_PRECISION="tf32", FEWER_QUERIES=False)
    # The Hopper switches (launch.py), where the configuration sets them.
    constants.update({name: bool(config.get(name, False)) for name in ("USE_TMA",)})
    if "FLUX_PARTS" in kernel.arg_names:  # the dq kernel's flux totals, as bf16 on sm_90 stores them
        constants["FLUX_PARTS"] = launch.warp_flux_parts(config)
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in floats:
            signature[name] = "fp32"
        else:
            is_pointer = name.isupper()
            signature[name] = ("*bf16" if name in LOW_PRECISION_POINTERS else "*fp32") if is_pointer else "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(kernel.arg_names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=TARGET, options=dict(num_warps=config["num_warps"],
                                                                  num_stages=config["num_stages"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(compiled.asm["cubin"])
        path = handle.name
    try:
        return subprocess.run([_nvdisasm(), "-c", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def loop_bodies(sass: str) -> list[collections.Counter]:
    """Opcode counts of every loop body: the instructions from a label to a branch back to it."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        instruction = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(.*?);", line)
        if instruction:
            instructions.append(instruction.group(1).strip())
    loops = []
    for end, text in enumerate(instructions):
        branch = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", text)
        if branch and labels.get(branch.group(1), end + 1) < end:
            body = instructions[labels[branch.group(1)]:end + 1]
            # The opcode without its predicate and modifiers: "@P0 FADD.FTZ R1, ..." -> FADD.
            opcodes = (re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            loops.append(collections.Counter(opcodes))
    return [loop for loop in loops if sum(loop.values()) > 50]  # leave out tiny wait loops


def summarise(loop: collections.Counter) -> dict:
    row = {"instructions": sum(loop.values())}
    for kind, opcodes in KINDS.items():
        row[kind] = sum(loop[o] for o in opcodes)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--head-dim", type=int, default=128, choices=[32, 64, 128, 256])
    provenance.add_options(parser)
    args = parser.parse_args(argv)
    provenance.settle_or_exit(parser, args)
    rows = []
    for name, (kernel, floats) in KERNELS.items():
        # The gated tiles, for both variants.
        config = launch.TUNING.config(name, ARCH, block_d=launch.block_d_for(args.head_dim), gate=True)
        counts = {}
        for has_gate in (False, True):
            loops = loop_bodies(compile_sass(kernel, floats, config, has_gate, args.head_dim))
            # At least 32 scores per thread (a 64 x 64 tile over 128 threads); masking selects
            # each of them, the unmasked loop only per row.
            unmasked = [loop for loop in loops if loop["FSEL"] < 16]
            # The unmasked loop: the largest loop without selects; the rest, largest first.
            order = sorted(unmasked, key=lambda c: -sum(c.values()))[:1]
            order += sorted((loop for loop in loops if loop not in order), key=lambda c: -sum(c.values()))
            for position, loop in enumerate(order):
                label = "unmasked tiles" if position == 0 and unmasked else f"masked loop {position}"
                row = {"kernel": name, "gate": has_gate, "loop": label,
                       "tile": f"{config['BLOCK_M']}x{config['BLOCK_N']}", **summarise(loop)}
                counts[(label, has_gate)] = row["instructions"]
                rows.append(row)
        for row in rows:
            if row["kernel"] == name and row["gate"] and (row["loop"], False) in counts:
                row["x of no gate"] = row["instructions"] / counts[(row["loop"], False)]
        print(name, [(r["loop"], r["gate"], r["instructions"]) for r in rows if r["kernel"] == name], flush=True)
    env = environment()
    env["compiled for"] = "sm_90 (H100/H200), offline"
    name = "kernel_instructions" if args.head_dim == 128 else f"kernel_instructions_d{args.head_dim}"
    write_results(args.out, name, {"environment": env, "head_dim": args.head_dim, "rows": rows}, rows,
                  ["kernel", "tile", "loop", "gate", "instructions", "x of no gate", *KINDS])


if __name__ == "__main__":
    main()
