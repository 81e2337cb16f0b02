"""TEST DOUBLE of ``habana_frameworks.torch.distributed`` (package only)."""
