"""Pallas kernels for sparse dispatch, each beside its pure-JAX reference.

  platform.py                  which body runs where ("tpu" Mosaic, "gpu" Triton dialect,
                               interpret mode on CPU)
  group_metadata.py            the (group, row tile) visit list, built once per step
  grouped_matmul.py            gmm, dlhs and tgmm (dW) as one custom-VJP op; make_plan
    grouped_matmul_tpu.py      Mosaic body (scalar-prefetched visit list)
    grouped_matmul_gpu.py      Triton-dialect body (masked stores)
    grouped_matmul_mgpu.py     JAX's Mosaic-GPU Hopper kernels under the same VJP
    grouped_matmul_reference.py
  gather_scatter_matmul.py     permute fused on load, weighted unpermute on store (GPU)
    gather_scatter_reference.py
  moe_ffn.py                   the routed SwiGLU FFN on these kernels, backward written out
                               (the `pallas` dispatch backend, moejax/moe/dispatch/pallas.py)
  atomic_experts.py            OmniMoE/PEER single-neuron experts, expert-centric
  product_topk.py              product-key top-k router (one body for Mosaic and Triton)
  l3_lookup.py                 L3 per-token softmax over the token's own rows

References: each kernel's tests compare it with an independent computation
(the *_reference.py files, or the pure-JAX paths in moejax/ it replaces).
"""
