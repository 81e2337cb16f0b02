"""TEST DOUBLE of ``habana_frameworks.torch.distributed.hccl``.

The real module registers the "hccl" backend with ``torch.distributed``.
accelerate imports it from ``is_hpu_available(init_hccl=True)``
(accelerate/utils/imports.py:451) whenever ``LOCAL_RANK`` is set.  The double
registers nothing: importing it is recorded, and because ``torch.hpu`` does not
exist accelerate then falls back to MULTI_CPU/gloo.
"""

from habana_frameworks import record

record("distributed.hccl.import")
