"""Pure functions on tensors (no nn.Module): references, Triton kernels, public ops."""
