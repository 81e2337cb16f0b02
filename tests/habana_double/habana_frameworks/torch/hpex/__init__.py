"""TEST DOUBLE of ``habana_frameworks.torch.hpex`` (HPU extensions).

Provides ``hpex.optimizers.FusedAdamW`` and ``hpex.normalization.FusedClipNorm`` as
PyTorch's AdamW / clip_grad_norm_ (recorded), for Gaudi configs that ask for them, and
``hpex.kernels.FusedSDPA`` as a CPU stand-in of the fused attention kernel (see kernels.py).
Deliberately does NOT provide FusedRMSNorm or the fused RoPE kernels: optimum-habana
imports those inside ``try/except ImportError``, so their absence selects the plain
PyTorch fallbacks on CPU.  Only ``hpex.kernels.FusedSDPA`` is imported
unconditionally (optimum/habana/transformers/integrations/gaudi_fused_sdpa_attention.py:5).
"""
