"""TEST DOUBLE of ``habana_frameworks.torch.hpex.normalization``.

Only ``FusedClipNorm`` (GaudiTrainer uses it when the Gaudi config says ``use_fused_clip_norm``): it clips
with PyTorch's own ``clip_grad_norm_`` and records the call. ``FusedRMSNorm`` is deliberately absent, so the
models' ``try: from ... import FusedRMSNorm`` falls back to plain PyTorch on CPU.
"""

import torch

from habana_frameworks import record


class FusedClipNorm:
    def __init__(self, parameters, max_norm):
        record("hpex.normalization.FusedClipNorm", max_norm=max_norm)
        self.max_norm = max_norm

    def clip_norm(self, parameters):
        record("hpex.normalization.FusedClipNorm.clip_norm")
        return torch.nn.utils.clip_grad_norm_(parameters, self.max_norm)
