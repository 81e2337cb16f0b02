"""TEST DOUBLE of ``habana_frameworks.torch`` (see the ``habana_frameworks`` docstring).

The real package registers the "hpu" device and ``torch.hpu`` with PyTorch on
import; the double does neither, so PyTorch itself rejects ``torch.device("hpu")``
tensors and the HF libraries conclude that no HPU is available.
"""

from . import core, hpu  # noqa: F401  (the real package exposes both as attributes)
