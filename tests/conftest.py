# Licensed under the Apache License, Version 2.0 (the "License").
"""Shared fixtures: tiny offline Gemma 3 assets built once per test session."""

import os
import sys
from pathlib import Path

import pytest

# Every test runs offline; the model hub is never reachable here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
for path in (REPO_ROOT, TESTS_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """{"model": tiny Gemma 3 folder, "dataset": tiny ChartQA save_to_disk folder}."""
    import tiny_assets

    return tiny_assets.write_assets(str(tmp_path_factory.mktemp("assets")))


@pytest.fixture(scope="session")
def processor(assets):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(assets["model"])


def train_argv(assets, output_dir, *extra, dataset=None):
    """Flags for a short CPU run on the tiny assets; `extra` flags come last and win."""
    return [
        "--model_name_or_path", assets["model"],
        "--dataset_name", dataset or assets["dataset"],
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "2e-3",
        "--num_train_epochs", "1",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--seed", "0",
        "--dataloader_pin_memory", "False",
        *extra,
    ]


@pytest.fixture(autouse=True)
def restore_environment():
    """Undo environment changes a test's in-process run leaves behind.

    TrainingArguments(bf16=True) exports ACCELERATE_MIXED_PRECISION=bf16, and accelerate's state exports rank
    variables; left in place they would silently switch later runs (and their subprocesses) to bf16.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
