# Licensed under the Apache License, Version 2.0 (the "License").
"""Crash, preemption, determinism, non-finite losses and pre-flight checks."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import run_lora_vlm as rlv
from conftest import TESTS_DIR, run_training, train_argv
from interrupted_main import with_signal_at_step


def six_steps(assets, output_dir, *extra):
    return train_argv(assets, output_dir, "--do_train", "--max_train_samples", "24", "--per_device_train_batch_size", "2",
                      "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", *extra)


def killed_at_step(argv, step):
    """The command in its own process, killed with SIGKILL (as a crash or the OOM killer) right after `step`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(TESTS_DIR / "interrupted_main.py"), "--at_step", str(step),
                           "--signal", "KILL", *argv], capture_output=True, text=True, timeout=600, env=env)


def signal_this_process_at_step(monkeypatch, step, signum):
    """Make the next in-process run send this process `signum` right after training step `step`."""
    monkeypatch.setattr(rlv, "build_trainer", with_signal_at_step(rlv.build_trainer, step, signum))


def logged_losses(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def adapter(output_dir):
    return load_file(str(output_dir / "adapter_model.safetensors"))


def assert_same_adapter(a, b, exact=False):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]) if exact else torch.allclose(a[name], b[name], atol=1e-6), name


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run_a")
    run_training(six_steps(assets, output_dir))
    return output_dir


def test_a_killed_run_resumes_to_the_same_adapter_and_losses(assets, uninterrupted, tmp_path):
    argv = six_steps(assets, tmp_path)
    killed = killed_at_step(argv, 3)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    # A checkpoint cut short while being written: it must not be picked.
    partial = tmp_path / "checkpoint-4"
    shutil.copytree(tmp_path / "checkpoint-2", partial)
    (partial / "trainer_state.json").unlink()
    assert rlv.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    resumed = run_training(argv)  # the same command again; it rewrites checkpoint-4 on its way
    assert resumed.state.global_step == 6
    assert rlv.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    # The log history continues the killed run's: steps 1-2 come from checkpoint-2, 3-6 from the resumed run.
    losses, expected = logged_losses(tmp_path), logged_losses(uninterrupted)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert [losses[s] for s in range(1, 7)] == pytest.approx([expected[s] for s in range(1, 7)], rel=1e-5)
    assert_same_adapter(adapter(tmp_path), adapter(uninterrupted))


def test_sigterm_saves_a_checkpoint_exits_nonzero_and_resumes(assets, uninterrupted, tmp_path, monkeypatch, caplog):
    """SIGTERM really delivered to this process mid-run; the run exits with SystemExit, as a program would."""
    argv = six_steps(assets, tmp_path)
    signal_this_process_at_step(monkeypatch, 3, signal.SIGTERM)
    # Should the script not handle SIGTERM, this handler fails the test instead of terminating pytest.
    fallback = signal.signal(signal.SIGTERM, lambda signum, frame: pytest.fail("SIGTERM reached no handler of the script"))
    try:
        with caplog.at_level("ERROR"), pytest.raises(SystemExit) as exited:
            run_training(argv)
    finally:
        signal.signal(signal.SIGTERM, fallback)
    assert exited.value.code == rlv.PREEMPTED_EXIT_CODE
    assert "Preempted (SIGTERM): stopped after step 3" in caplog.text
    assert "Resume with the same command" in caplog.text
    assert rlv.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    assert not (tmp_path / "adapter_model.safetensors").exists()  # no final adapter from a cut-short run
    monkeypatch.undo()
    trainer = run_training(argv)
    assert trainer.state.global_step == 6
    assert_same_adapter(adapter(tmp_path), adapter(uninterrupted))


def test_two_identical_runs_give_identical_adapters(assets, uninterrupted, tmp_path):
    run_training(six_steps(assets, tmp_path))
    assert logged_losses(tmp_path) == logged_losses(uninterrupted)
    assert_same_adapter(adapter(tmp_path), adapter(uninterrupted), exact=True)


def nan_at_second_call(monkeypatch):
    calls = {"n": 0}
    original = rlv.causal_lm_loss

    def loss(outputs, labels, num_items_in_batch=None):
        value = original(outputs, labels, num_items_in_batch)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 2:
                return value * float("nan")
        return value

    monkeypatch.setattr(rlv, "causal_lm_loss", loss)


def test_a_nan_loss_stops_the_run_naming_the_step_and_rows(assets, tmp_path, monkeypatch):
    nan_at_second_call(monkeypatch)
    with pytest.raises(FloatingPointError, match=r"Non-finite loss \(nan\) at training step 2, train rows \[\d+, \d+\]"):
        run_training(six_steps(assets, tmp_path))


def test_a_nan_loss_can_be_skipped_without_touching_the_weights(assets, tmp_path, monkeypatch):
    nan_at_second_call(monkeypatch)
    trainer = run_training(six_steps(assets, tmp_path, "--non_finite_loss", "skip", "--optim", "sgd"))
    assert trainer.state.global_step == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    monitor = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, rlv.TrainingLossMonitor))
    assert monitor.skipped_batches == 1


def test_dry_run_checks_batches_without_loading_the_model(assets, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(rlv, "load_model", lambda *a, **k: pytest.fail("the dry run loaded the model"))
    with caplog.at_level("INFO"):
        assert rlv.cli(train_argv(assets, tmp_path, "--do_train", "--dry_run_data", "3", "--per_device_train_batch_size", "4")) == 0
    assert "Dry run passed: {'batches': 3, 'rows': 12, 'images': 12}" in caplog.text
    assert re.search(r"model\n\[\[[^\[\]]+<end_of_turn>\]\]", caplog.text)


def test_too_little_disk_space_fails_before_loading_anything(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(rlv, "load_processor", lambda *a, **k: pytest.fail("loaded the processor"))
    with pytest.raises(ValueError, match="--min_free_disk_gb"):
        run_training(train_argv(assets, tmp_path / "new", "--do_train", "--min_free_disk_gb", "1000000"))


def test_incomplete_or_mismatched_checkpoints_are_passed_over(tmp_path):
    def checkpoint(folder, step, state):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        if state is not None:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)

    for step, state in ((2, {"global_step": 2}), (4, {"global_step": 4}), (6, None), (8, "{cut"), (10, {"global_step": 9})):
        checkpoint(tmp_path / "run", step, state if state is None or isinstance(state, str) else json.dumps(state))
    assert rlv.last_complete_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-4")
    # Only incomplete checkpoints: none to resume from, not the newest folder.
    checkpoint(tmp_path / "cut_short", 6, None)
    checkpoint(tmp_path / "cut_short", 8, "{cut")
    assert rlv.last_complete_checkpoint(tmp_path / "cut_short") is None
