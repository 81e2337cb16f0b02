"""TEST DOUBLE of ``habana_frameworks.torch.hpex.kernels``.

Only ``FusedSDPA`` exists (imported unconditionally by
``optimum/habana/transformers/integrations/gaudi_fused_sdpa_attention.py:5``).
Using it raises :class:`habana_frameworks.HPUUnavailableError`.
"""

from habana_frameworks import refuse


class FusedSDPA:
    @staticmethod
    def apply(*args, **kwargs):
        refuse("hpex.kernels.FusedSDPA.apply")
