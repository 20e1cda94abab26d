"""Plan kernels of the Triton backend: one module per layer (guidedrop/layers.py's contract).

Each module fuses the arithmetic of one layer between the streaming kernels (statistics,
apply) into one plan kernel and exposes ``plan_<layer>(x, ...)``, the layer's signature
less the backend; ``guidedrop.triton_kernels`` re-exports it, and ``layers.fusable`` calls
it in place of the layer's torch code (the reference plan).
"""
