"""TEST DOUBLE of ``habana_frameworks.torch.utils.experimental``.

optimum-habana calls ``_get_device_type()`` at import time
(``transformers/quantizers/quantizer_finegrained_fp8.py:16``); with no HPU the
double answers ``synDeviceType.synDeviceTypeInvalid``.
"""

import enum

from habana_frameworks import record
from habana_frameworks.torch import hpu  # noqa: F401  (real module exposes `hpu`)


class synDeviceType(enum.IntEnum):  # noqa: N801  (name mirrors the real enum)
    synDeviceGaudi = 1
    synDeviceGaudi2 = 4
    synDeviceGaudi3 = 5
    synDeviceTypeInvalid = 7


def _get_device_type():
    record("utils.experimental._get_device_type")
    return synDeviceType.synDeviceTypeInvalid
