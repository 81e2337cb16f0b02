"""TEST DOUBLE of ``habana_frameworks.torch.hpu``: reports that there is *no* HPU.

Unlike the real module, importing it does NOT create ``torch.hpu``; so
``accelerate.utils.is_hpu_available()`` and
``transformers.utils.is_torch_hpu_available()`` stay False, and
``GaudiTrainingArguments(...).device`` resolves to CPU.
"""

import contextlib

from habana_frameworks import record, refuse

from . import random  # noqa: F401  (real package exposes `hpu.random`)


def is_available():
    record("hpu.is_available")
    return False


def device_count():
    record("hpu.device_count")
    return 0


def is_initialized():
    """No HPU runtime was initialised.

    optimum-habana calls this at import time of
    ``optimum/habana/transformers/gradient_checkpointing.py`` and then sets
    torch.utils.checkpoint's default device type to "hpu".
    """
    record("hpu.is_initialized")
    return False


def get_device_name(device=None):
    refuse("hpu.get_device_name")


def current_device():
    refuse("hpu.current_device")


def synchronize(device=None):
    """Nothing runs asynchronously on a missing HPU: record only."""
    record("hpu.synchronize", device=device)


def memory_stats(device=None):
    """No HPU, so no HPU memory in use: all counters are 0.

    Called unconditionally by ``GaudiTrainer.log()`` through
    ``optimum.habana.utils.get_hpu_memory_stats`` (utils/misc.py:172).
    """
    record("hpu.memory_stats", device=device)
    return {"InUse": 0, "MaxInUse": 0, "Limit": 0}


def reset_peak_memory_stats(device=None):
    record("hpu.reset_peak_memory_stats", device=device)


def enable_dynamic_shape():
    record("hpu.enable_dynamic_shape")


def disable_dynamic_shape():
    """GaudiTrainer.__init__ calls this when use_habana and use_lazy_mode
    (optimum/habana/transformers/trainer.py:313-316)."""
    record("hpu.disable_dynamic_shape")


def wrap_in_hpu_graph(module, *args, **kwargs):
    refuse("hpu.wrap_in_hpu_graph")


class ModuleCacher:
    def __init__(self, *args, **kwargs):
        refuse("hpu.ModuleCacher")


# Fused-attention recompute switch: a plain flag, as in Habana's hpu/sdp_kernel_flag.py
# (HabanaAI/gaudi-pytorch-bridge), where it starts True. Only hpex.kernels.FusedSDPA reads it.
_recompute_sdp = True


def enable_recompute_sdp(enabled):
    global _recompute_sdp
    record("hpu.enable_recompute_sdp", enabled=enabled)
    _recompute_sdp = bool(enabled)


def recompute_sdp_enabled():
    return _recompute_sdp


@contextlib.contextmanager
def sdp_kernel(enable_recompute=True):
    """Sets the recompute flag of FusedSDPA for the block and restores it after (recorded).

    The Gaudi ports wrap every FusedSDPA call in it (e.g. gemma3/modeling_gemma3.py:316,325,328).
    """
    global _recompute_sdp
    record("hpu.sdp_kernel", enable_recompute=enable_recompute)
    saved = _recompute_sdp
    _recompute_sdp = bool(enable_recompute)
    try:
        yield {}
    finally:
        _recompute_sdp = saved
