"""TEST DOUBLE of Intel Gaudi's ``habana_frameworks`` package -- NOT the real thing.

Lives in ``tests/habana_double/`` and is only ever put on ``sys.path`` /
``PYTHONPATH`` by tests.  The product (run_lora_vlm.py) must never need it.

Why: optimum-habana imports ``habana_frameworks`` (module level in several
files, and unconditionally in ``GaudiTrainer.log()`` for HPU memory stats), so
``optimum.habana`` cannot be imported or exercised on a CPU-only machine.  This
double provides the minimal surface optimum-habana 1.21.2 touches so that a
``GaudiTrainer`` with ``use_habana=False, use_lazy_mode=False`` can train on
CPU in tests.

Rules of the double:
* every fake function RECORDS its call in :data:`CALLS` (see :func:`calls`,
  :func:`count`, :func:`reset`) so tests can assert on e.g. ``mark_step``;
* the fakes are honest no-ops: there is no HPU here, ``hpu.is_available()`` is
  False and ``device_count()`` is 0;
* anything that would need a real HPU (HPU graphs, moving tensors to "hpu",
  ...) raises :class:`HPUUnavailableError`; the only exceptions are CPU stand-ins
  that compute what a kernel is documented to compute (``hpex.kernels.FusedSDPA``,
  ``hpex.optimizers.FusedAdamW``, ``hpex.normalization.FusedClipNorm``).
"""

import threading

IS_TEST_DOUBLE = True
__version__ = "0.0.0+testdouble"

#: Every recorded call, in order: ``(qualified_name, args, kwargs)``.
CALLS = []
_lock = threading.Lock()


class HPUUnavailableError(RuntimeError):
    """Raised when code tries to really use an HPU through the test double."""


def record(name, *args, **kwargs):
    with _lock:
        CALLS.append((name, args, kwargs))


def calls(name=None):
    """Recorded calls, optionally only those whose name equals ``name``."""
    with _lock:
        return [c for c in CALLS if name is None or c[0] == name]


def count(name):
    return len(calls(name))


def reset():
    with _lock:
        CALLS.clear()


def refuse(what):
    """Record and reject an attempt to use real HPU functionality."""
    record(what)
    raise HPUUnavailableError(
        f"{what}: this is the habana_frameworks TEST DOUBLE (tests/habana_double); "
        "there is no Gaudi HPU on this machine. Run with use_habana=False / "
        "use_lazy_mode=False on CPU, or on a real Gaudi host with the real SynapseAI stack."
    )
