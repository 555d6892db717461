"""What the op families share, and nothing family-specific:

    custom_op.py       KernelOp: a Triton path as custom ops with their backward (torch.compile)
                       and an autograd.Function (eager calls), built from one forward and backward
    online_softmax.py  the online softmax step of the attention kernels and its epilogue
    head_major.py      device helpers for the [sequences, heads, T] buffers of row statistics
    varlen.py          packed sequences (cu_seqlens): spans on the host, bounds in kernels
    hardware.py        what launch configurations ask of the GPU (its SM count)
    validation.py      argument checks, one per concept (tensors, window, scale, cu_seqlens, ...)
    triton_support.py  Triton (optional), the interpreter switch, constants, host helpers
"""
