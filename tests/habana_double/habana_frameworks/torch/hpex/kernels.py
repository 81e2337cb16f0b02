"""TEST DOUBLE of ``habana_frameworks.torch.hpex.kernels``.

Only ``FusedSDPA`` exists (imported unconditionally by
``optimum/habana/transformers/integrations/gaudi_fused_sdpa_attention.py:5`` and, inside
``try/except ImportError``, by the model ports). Unlike the other kernels of the double it does
not refuse: it is a CPU stand-in that computes what the kernel is documented to compute, so the
Gaudi ports' fused-attention path (e.g. Gemma 3 with ``use_flash_attention=True``) runs forward
and backward in tests.

What it implements, and where each rule comes from
--------------------------------------------------
Sources: Habana's Python wrapper of the kernel,
``python_packages/habana_frameworks/torch/hpex/kernels/FusedSDPA.py`` in HabanaAI/gaudi-pytorch-bridge
(commit f90046f4e6efe15d0e7ba218c974a816cc038c71), which points to
https://docs.habana.ai/en/latest/PyTorch/Python_Packages.html#hpex-kernels-fusedsdpa; its C++ node
``hpu_ops/backend/sdpa_gen.cpp`` (same repository); ``hpu/sdp_kernel_flag.py`` for the recompute
default; and the call sites in optimum-habana 1.21.2 (``models/gemma3/modeling_gemma3.py:317,326,335``,
``models/llama/modeling_llama.py:296-308``).

* Positional arguments, as optimum-habana passes them: ``q, k, v, attn_mask, dropout_p, is_causal,
  scale, softmax_mode, recompute_mode, valid_sequence_lengths, padding_side`` (the wrapper names the
  last two ``valid_seq_len`` / ``seq_padding_type``; both spellings are accepted as keywords).
* Shapes ``[batch, heads, length, head_dim]``; output ``[batch, q_heads, q_length, v_head_dim]`` in
  ``q``'s dtype. Grouped-query attention: ``k``/``v`` may have fewer heads than ``q`` when they divide
  them; query head ``h`` uses key/value head ``h // (q_heads // kv_heads)`` (the wrapper's reshape to
  ``[batch, groups, heads_per_group, ...]``); one key/value head broadcasts to all.
* ``scale``: ``None`` means ``1 / sqrt(head_dim)``; scores are ``scale * q @ k^T``.
* ``attn_mask``: a float mask is ADDED to the scores (``[batch, 1 or heads, q_length, kv_length]``,
  broadcast); its dtype must be ``q``'s, as Habana's kernel requires (RuntimeError otherwise), so a float32
  mask with bf16 queries is caught here. A bool mask follows torch's ``scaled_dot_product_attention`` (True = may attend); the
  wrapper passes masks through unchanged, so the kernel's own handling of bool masks is not
  confirmed by these sources (optimum-habana passes float masks).
* ``is_causal``: key ``j`` is visible to query ``i`` iff ``j <= i`` (torch's lower-triangular mask).
  The double refuses ``is_causal`` together with a mask, or with ``q_length != kv_length``: the
  sources do not say how the kernel combines or aligns them, and callers do not do it.
* ``valid_sequence_lengths`` (``[batch]`` ints) masks key positions past each row's valid length:
  with ``padding_side="right"`` keys ``j >= valid``, with ``"left"`` keys ``j < kv_length - valid``.
  As in the wrapper, it is accepted only with ``is_causal=True`` and without backward (inference).
* ``softmax_mode``: ``"None"`` (exact softmax) and ``"fast"`` (an approximate softmax on HPU,
  ``SDPA_SOFTMAX_HF8_1C`` in sdpa_gen.cpp) are computed with the SAME exact fp32 softmax here;
  ``"fp32"`` only with bf16 inputs and without backward, as in the wrapper. The wrapper's check that
  ``"fast"`` with recompute in training needs ``is_causal`` is kept (AssertionError, like the real one).
* ``recompute_mode``: ``None`` means ``habana_frameworks.torch.hpu.recompute_sdp_enabled()`` (True
  unless changed by ``hpu.sdp_kernel(enable_recompute=...)``). Recompute only trades memory for
  compute in the backward pass; the result is the same, so it changes nothing here but is recorded.
* ``dropout_p``: dropout on the attention probabilities (torch's dropout; HPU random numbers differ).
* Everything is computed in float32 with plain torch ops, so autograd gives the gradients. Masked
  scores are set to float32's lowest value, not -inf, so a row with every key masked gets uniform
  weights rather than NaN (such rows are padding; the kernel's value for them is not specified).

Every call is recorded as ``"hpex.kernels.FusedSDPA.apply"`` with the shapes and flags (no tensors).
"""

import math

import torch

from habana_frameworks import record


class FusedSDPA:
    @staticmethod
    def apply(
        q,
        k,
        v,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        softmax_mode="None",
        recompute_mode=None,
        valid_sequence_lengths=None,
        padding_side="left",
        **kwargs,
    ):
        # The wrapper's own keyword names for the last two arguments.
        valid_sequence_lengths = kwargs.pop("valid_seq_len", valid_sequence_lengths)
        padding_side = kwargs.pop("seq_padding_type", padding_side)
        if kwargs:
            raise TypeError(f"FusedSDPA.apply() got unexpected keyword arguments {sorted(kwargs)}")

        requires_backward = q.requires_grad or k.requires_grad or v.requires_grad
        softmax_mode = str(softmax_mode).lower()
        padding_side = str(padding_side).lower()
        if recompute_mode is None:
            from habana_frameworks.torch import hpu

            recompute_mode = hpu.recompute_sdp_enabled()
        record(
            "hpex.kernels.FusedSDPA.apply",
            q_shape=tuple(q.shape),
            k_shape=tuple(k.shape),
            mask_shape=None if attn_mask is None else tuple(attn_mask.shape),
            mask_dtype=None if attn_mask is None else str(attn_mask.dtype),
            dropout_p=dropout_p,
            is_causal=bool(is_causal),
            scale=scale,
            softmax_mode=softmax_mode,
            recompute=bool(recompute_mode),
            valid_sequence_lengths=valid_sequence_lengths is not None,
            padding_side=padding_side,
            requires_backward=requires_backward,
        )

        # The wrapper's preconditions (same messages, same exception type).
        if recompute_mode and requires_backward and softmax_mode == "fast":
            assert is_causal, (
                "Optimized softmax mode is supported in recompute training mode only in causal(triangular) mask case"
            )
        if valid_sequence_lengths is not None:
            assert is_causal and not requires_backward, (
                "Valid sequence length is supported only in inference with is_causal(triangular) mask case"
            )
        if softmax_mode == "fp32":
            assert not requires_backward and q.dtype == torch.bfloat16, (
                "softmax_mode = fp32 is supported only for inference mode and when q/k/v inputs are BF16"
            )
        if softmax_mode not in ("none", "fast", "fp32"):
            raise ValueError(f"FusedSDPA test double: unknown softmax_mode {softmax_mode!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"FusedSDPA test double: unknown padding_side {padding_side!r}")

        if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise RuntimeError(
                f"FusedSDPA test double: attn_mask is {attn_mask.dtype} but q is {q.dtype}; Habana's kernel takes an "
                "additive mask only in q's dtype."
            )

        q_len, kv_len = q.shape[-2], k.shape[-2]
        if is_causal and (attn_mask is not None or q_len != kv_len):
            raise NotImplementedError(
                "FusedSDPA test double: is_causal with an attn_mask or with q_length != kv_length is not "
                "documented, so the double does not guess what the kernel computes."
            )

        q_heads, kv_heads = q.shape[1], k.shape[1]
        if kv_heads not in (1, q_heads):
            if q_heads % kv_heads:
                raise RuntimeError(f"FusedSDPA: {q_heads} query heads cannot be grouped over {kv_heads} key/value heads")
            k = k.repeat_interleave(q_heads // kv_heads, dim=1)
            v = v.repeat_interleave(q_heads // kv_heads, dim=1)

        if scale is None:
            scale = 1.0 / math.sqrt(q.size(-1))
        scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale

        # Positions no query may see, as one bool tensor broadcast to the scores.
        hidden = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                hidden = ~attn_mask
            else:
                scores = scores + attn_mask.float()
        key_positions = torch.arange(kv_len, device=q.device)
        if is_causal:
            query_positions = torch.arange(q_len, device=q.device)
            causal_hidden = key_positions[None, :] > query_positions[:, None]
            hidden = causal_hidden if hidden is None else hidden | causal_hidden
        if valid_sequence_lengths is not None:
            valid = valid_sequence_lengths.to(q.device).reshape(-1, 1, 1, 1)
            if padding_side == "right":
                padded = key_positions.view(1, 1, 1, -1) >= valid
            else:
                padded = key_positions.view(1, 1, 1, -1) < kv_len - valid
            hidden = padded if hidden is None else hidden | padded
        if hidden is not None:
            scores = scores.masked_fill(hidden, torch.finfo(torch.float32).min)

        probabilities = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probabilities = torch.nn.functional.dropout(probabilities, p=dropout_p, training=True)
        return torch.matmul(probabilities, v.float()).to(q.dtype)
