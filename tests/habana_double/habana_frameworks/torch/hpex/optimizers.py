"""TEST DOUBLE of ``habana_frameworks.torch.hpex.optimizers``.

``FusedAdamW`` is what GaudiTrainer builds when the Gaudi config says ``use_fused_adam`` (as Habana/gpt2
does). Here it is PyTorch's own AdamW on CPU, recording that it was built, so the seed command's Gaudi
config can be used unchanged in tests.
"""

import torch

from habana_frameworks import record


class FusedAdamW(torch.optim.AdamW):
    def __init__(self, params, *args, **kwargs):
        record("hpex.optimizers.FusedAdamW", **{k: v for k, v in kwargs.items() if k != "params"})
        super().__init__(params, *args, **kwargs)
