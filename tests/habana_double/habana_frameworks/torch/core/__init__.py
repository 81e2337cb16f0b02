"""TEST DOUBLE of ``habana_frameworks.torch.core``: recording no-ops."""

import sys

from habana_frameworks import record


def mark_step(device_str="", sync=False):
    """Lazy-mode graph break. On CPU there is nothing to flush: record the call
    (with the caller's ``file:line`` as ``caller``) and return."""
    f = sys._getframe(1)
    record("core.mark_step", device_str=device_str, sync=sync, caller=f"{f.f_code.co_filename}:{f.f_lineno}")
