"""What the op families share, and nothing family-specific:

    triton_support.py  Triton (optional), the interpreter switch, constants, host helpers
    varlen.py          packed sequences (cu_seqlens): spans on the host, bounds in kernels
    validation.py      argument checks, one per concept (tensors, window, scale, cu_seqlens, ...)
"""
