# Licensed under the Apache License, Version 2.0 (the "License").
"""Gradient accumulation is exact: 4 accumulated batches of 1 train like one batch of 4."""

import pytest
import torch

from conftest import run_training, train_argv


def run(assets, output_dir, batch_size, accumulation):
    trainer = run_training(train_argv(
        assets, output_dir, "--do_train", "--max_train_samples", "8", "--max_steps", "2",
        "--per_device_train_batch_size", str(batch_size), "--gradient_accumulation_steps", str(accumulation),
        # Plain SGD moves the weights by exactly lr x gradient, so equal weights mean equal gradients.
        "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--lora_dropout", "0",
        "--max_grad_norm", "0",
    ))
    lora = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return lora, losses


def test_accumulating_four_batches_of_one_equals_one_batch_of_four(assets, tmp_path):
    lora_a, losses_a = run(assets, tmp_path / "batch4", batch_size=4, accumulation=1)
    lora_b, losses_b = run(assets, tmp_path / "accumulate4", batch_size=1, accumulation=4)
    # The tiny charts' answers range from one token ("3") to several ("orange", "Yes"), so a per-batch mean
    # (the usual bug) would weigh them differently and fail this.
    assert losses_a == pytest.approx(losses_b, rel=1e-4)
    assert lora_a.keys() == lora_b.keys()
    moved = 0
    for name in lora_a:
        assert torch.allclose(lora_a[name], lora_b[name], atol=1e-5, rtol=1e-4), name
        moved += int(lora_a[name].abs().sum() > 0)
    assert moved == len(lora_a)  # after two steps both lora_A and lora_B have moved
