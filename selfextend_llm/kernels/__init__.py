"""The attention kernels: everything that computes SelfExtend attention, and nothing that chooses.

* :mod:`.lse`: fused kernels that return the row log-sum-exp, and the exact merge of parts;
* :mod:`.blocks`: the block algorithm on those kernels (CPU, softcapping, custom masks), the
  grouped-key cache kept between decode steps, and the explicit-score decode step;
* :mod:`.flex`: two block-sparse ``flex_attention`` passes;
* :mod:`.static_decode`: a tensor-only decode step over a static cache (compiles, CUDA graphs);
* :mod:`.triton`: the Triton kernels (one-pass and split prefill, split-K decode, re-rotation);
* :mod:`.quantized`: linear layers over a GGUF file's 4-/8-bit blocks (CPU);
* :mod:`.native`: small C kernels for the CPU's decode step and quantised products, built at first use.

:func:`selfextend_llm.attention.selfextend_attention` picks among them.
"""
