"""TEST STUB of ``torchvision.transforms``: importable, unusable (see package docstring)."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(
        f"torchvision.transforms.{name}: this is the torchvision TEST STUB in "
        "tests/habana_double/torchvision_stub; install the real torchvision to use it."
    )
