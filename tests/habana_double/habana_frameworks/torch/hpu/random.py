"""TEST DOUBLE of ``habana_frameworks.torch.hpu.random``: recording no-ops.

There is no HPU generator; the RNG "state" is an empty byte tensor so that
checkpoint save/restore code paths can round-trip it.
"""

import torch

from habana_frameworks import record


def manual_seed(seed):
    record("hpu.random.manual_seed", seed)


def manual_seed_all(seed):
    record("hpu.random.manual_seed_all", seed)


def get_rng_state(device="hpu"):
    record("hpu.random.get_rng_state", device=device)
    return torch.empty(0, dtype=torch.uint8)


def get_rng_state_all():
    record("hpu.random.get_rng_state_all")
    return []


def set_rng_state(new_state, device="hpu"):
    record("hpu.random.set_rng_state", device=device)


def set_rng_state_all(new_states):
    record("hpu.random.set_rng_state_all")
