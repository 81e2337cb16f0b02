# Licensed under the Apache License, Version 2.0 (the "License").
"""Gradient accumulation is exact: 4 accumulated batches of 1 train like one batch of 4, and with --packing 2
accumulated packs like a batch of 2 packs."""

import pytest
import torch

import run_lora_vlm as rlv
from conftest import run_training, train_argv


def lora_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def run(assets, output_dir, batch_size, accumulation, monkeypatch, *extra):
    """(LoRA weights before training, after it, logged losses) of a 2-step run."""
    initial = {}
    build_trainer = rlv.build_trainer

    def noting_initial_weights(model, *args, **kwargs):
        initial.update(lora_weights(model))  # the adapter as `main` hands it to the trainer, untrained
        return build_trainer(model, *args, **kwargs)

    monkeypatch.setattr(rlv, "build_trainer", noting_initial_weights)
    trainer = run_training(train_argv(
        assets, output_dir, "--do_train", "--max_train_samples", "8", "--max_steps", "2",
        "--per_device_train_batch_size", str(batch_size), "--gradient_accumulation_steps", str(accumulation),
        # Plain SGD moves the weights by exactly lr x gradient, so equal weights mean equal gradients.
        "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--lora_dropout", "0",
        "--max_grad_norm", "0", *extra,
    ))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return initial, lora_weights(trainer.model), losses


# Packs of 64 tokens hold two of the tiny rows (25-28 tokens): 2 packs of 2 rows per step, with the rows' trained
# tokens differing from pack to pack.
@pytest.mark.parametrize("batch_size, extra", [(4, ()), (2, ("--packing", "--packing_length", "64"))],
                         ids=["rows", "packs"])
def test_accumulating_batches_of_one_equals_one_larger_batch(assets, tmp_path, monkeypatch, batch_size, extra):
    initial, lora_a, losses_a = run(assets, tmp_path / "batch", batch_size, 1, monkeypatch, *extra)
    initial_b, lora_b, losses_b = run(assets, tmp_path / "accumulate", 1, batch_size, monkeypatch, *extra)
    # The tiny charts' answers range from one token ("3") to several ("orange", "Yes"), so a per-batch mean
    # (the usual bug) would weigh them differently and fail this.
    assert losses_a == pytest.approx(losses_b, rel=1e-4)
    assert initial.keys() == initial_b.keys() == lora_a.keys() == lora_b.keys()
    assert {name.split(".lora_")[1][0] for name in initial} == {"A", "B"}
    for name in initial:
        assert torch.equal(initial[name], initial_b[name]), name  # the same seeded start
        assert torch.allclose(lora_a[name], lora_b[name], atol=1e-5, rtol=1e-4), name
    # After two steps both lora_A (random at the start) and lora_B (zero at the start) have moved; lora_A gets a
    # gradient only once lora_B is non-zero, i.e. in the second step.
    moved = {name for name in initial if not torch.allclose(lora_a[name], initial[name], rtol=0, atol=1e-6)}
    assert moved == set(initial)
    assert {name for name in initial if "lora_B" in name and initial[name].abs().sum() == 0} == {
        name for name in initial if "lora_B" in name}
