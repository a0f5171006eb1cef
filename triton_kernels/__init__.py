"""fastattn's Triton kernels, installed as ``fastattn.triton_kernels`` (Triton ships a global
package named ``triton_kernels``; ours must not shadow it).

attention.py (FlashAttention-2 forward / backward), decode.py (attention over a KV cache, split over
the keys), softmax_gate.py, configs.py (tiles, autotune configs), ops.py (registration as
``torch.ops.fastattn.triton_*``; imported by ``fastattn.backends`` when the Triton backend is first
probed, not here, so importing this package needs no triton)."""
