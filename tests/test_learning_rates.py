# Licensed under the Apache License, Version 2.0 (the "License").
"""--vision_learning_rate / --projector_learning_rate: the optimizer's parameter groups, one plain SGD step moving each
part by its own rate, and the refusals; the same run trains with --pan_and_scan and merges, so the merged model's
processor crops as training did. Then the same through GaudiTrainer (the habana_frameworks TEST DOUBLE, in a
subprocess that runs this file as a script), whose Gaudi config picks Habana's FusedAdamW itself."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import run_lora_vlm as rlv
from conftest import REPO_ROOT, habana_double_env, run_training, script_args, train_argv

RATES = {"vision": 0.5, "projector": 0.25, "rest": 0.1}


def part(name: str) -> str:
    """The part a trainable parameter belongs to, from its name, as the flags' help describes them."""
    if ".multi_modal_projector." in name:
        return "projector"
    return "vision" if ".vision_tower." in name else "rest"


class StepRecorder(transformers.TrainerCallback):
    """Every trainable parameter and its gradient just before the optimizer's first step, and the parameter after."""

    def __init__(self, model):
        self.model, self.before, self.grads, self.after = model, {}, {}, {}

    def trainable(self):
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.before:
            self.names = {id(p): name for name, p in self.model.named_parameters()}
            for name, p in self.trainable():
                self.before[name], self.grads[name] = p.detach().clone(), p.grad.detach().clone()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.after:
            self.after = {name: p.detach().clone() for name, p in self.trainable()}


def recording(build_trainer, recorders: list):
    """build_trainer, with a StepRecorder added to each trainer it builds (and to `recorders`)."""
    def recording_build_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        recorders.append(StepRecorder(trainer.model))
        trainer.add_callback(recorders[-1])
        return trainer

    return recording_build_trainer


def test_each_part_trains_at_its_own_rate_and_the_merged_processor_crops(assets, tmp_path, monkeypatch, caplog):
    recorders = []
    monkeypatch.setattr(rlv, "build_trainer", recording(rlv.build_trainer, recorders))
    argv = train_argv(
        assets, tmp_path, "--do_train", "--max_train_samples", "4", "--per_device_train_batch_size", "4",
        "--max_steps", "1", "--optim", "sgd", "--lr_scheduler_type", "constant", "--weight_decay", "0",
        "--learning_rate", str(RATES["rest"]), "--train_vision_tower", "--vision_learning_rate", str(RATES["vision"]),
        "--train_projector", "--projector_learning_rate", str(RATES["projector"]),
        "--pan_and_scan", "--pan_and_scan_min_crop_size", "16", "--pan_and_scan_max_crops", "3",
        "--pan_and_scan_min_ratio", "1.2", "--merge_adapter")
    with caplog.at_level(logging.INFO, logger="run_lora_vlm"):
        trainer = run_training(argv)
    recorder = recorders[0]

    # The optimizer's groups: each part's parameters at the rate asked for, every trainable parameter in one group
    # (named as at the step: merging the adapter afterwards replaced the LoRA layers).
    names = recorder.names
    rates_of = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            rates_of.setdefault(part(names[id(p)]), set()).add(group["lr"])
    assert rates_of == {name: {rate} for name, rate in RATES.items()}
    grouped = sorted(names[id(p)] for group in trainer.optimizer.param_groups for p in group["params"])
    assert grouped == sorted(recorder.before)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Optimizer parameter groups")]
    assert len(logged) == 1
    assert "vision_tower: learning rate 0.5" in logged[0] and "multi_modal_projector: learning rate 0.25" in logged[0]

    # One SGD step (no momentum, no weight decay, constant rate): new = old - rate * gradient, exactly per part.
    moved = {name: 0 for name in RATES}
    for name, before in recorder.before.items():
        rate, grad = RATES[part(name)], recorder.grads[name]
        torch.testing.assert_close(recorder.after[name], before - rate * grad, rtol=0, atol=1e-7)
        moved[part(name)] += int(grad.abs().sum() > 0)
    assert all(count > 0 for count in moved.values()), moved

    # The merged model's processor crops as training did.
    saved = json.loads((tmp_path / "merged" / "preprocessor_config.json").read_text())
    assert (saved["do_pan_and_scan"], saved["pan_and_scan_max_num_crops"], saved["pan_and_scan_min_crop_size"],
            saved["pan_and_scan_min_ratio_to_activate"]) == (True, 3, 16, 1.2)


@pytest.mark.parametrize("flag, needs", [("--vision_learning_rate", "--train_vision_tower"),
                                         ("--projector_learning_rate", "--train_projector")])
def test_a_part_rate_without_training_that_part_is_refused_in_one_line(flag, needs):
    with pytest.raises(rlv.UsageError, match=rf"^{flag} applies to the weights {needs} trains; add {needs} or drop it"):
        script_args(flag, "1e-4")
    assert getattr(script_args(flag, "1e-4", needs).lora, flag[2:]) == 1e-4


def test_gaudi_trainer_trains_each_part_at_its_own_rate_with_its_fused_adamw(assets, tmp_path):
    gaudi_config = tmp_path / "gaudi_config"
    gaudi_config.mkdir()
    (gaudi_config / "gaudi_config.json").write_text(json.dumps({"use_fused_adam": True}))
    argv = train_argv(
        assets, tmp_path / "out", "--do_train", "--max_train_samples", "4", "--per_device_train_batch_size", "4",
        "--max_steps", "1", "--lr_scheduler_type", "constant", "--weight_decay", "0",
        "--learning_rate", str(RATES["rest"]), "--train_vision_tower", "--vision_learning_rate", str(RATES["vision"]),
        "--train_projector", "--projector_learning_rate", str(RATES["projector"]),
        "--use_habana", "--use_cpu", "--gaudi_config_name", str(gaudi_config))
    out = tmp_path / "result.json"
    env = habana_double_env()
    # The script beside the double: run as a script, this file finds run_lora_vlm.py only on PYTHONPATH.
    env.update(PT_HPU_LAZY_MODE="0", PYTHONPATH=f"{env['PYTHONPATH']}:{REPO_ROOT}")
    result = subprocess.run([sys.executable, __file__, json.dumps(argv), str(out)], env=env, cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and out.exists(), result.stdout[-3000:] + result.stderr[-5000:]
    recorded = json.loads(out.read_text())
    assert recorded["optimizer"] == "FusedAdamW" and "GaudiTrainer" in recorded["trainer_classes"]
    assert recorded["rates_of"] == {name: [rate] for name, rate in RATES.items()}
    # AdamW's first step, no weight decay: new = old - rate * g / (|g| + eps), per part at its own rate.
    assert recorded["largest_error"] < 1e-6
    assert all(count > 0 for count in recorded["moved"].values()), recorded["moved"]


def gaudi_scenario(argv: list, out: str) -> None:
    """In the subprocess: train one step through build_trainer (GaudiTrainer here) and record what the test checks."""
    recorders = []
    rlv.build_trainer = recording(rlv.build_trainer, recorders)
    trainer = rlv.main(rlv.parse_args(argv))
    recorder, optimizer = recorders[0], trainer.optimizer
    rates_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates_of.setdefault(part(recorder.names[id(p)]), set()).add(group["lr"])
    eps, largest_error, moved = trainer.args.adam_epsilon, 0.0, {name: 0 for name in RATES}
    for name, before in recorder.before.items():
        grad = recorder.grads[name]
        expected = before - RATES[part(name)] * grad / (grad.abs() + eps)
        largest_error = max(largest_error, float((recorder.after[name] - expected).abs().max()))
        moved[part(name)] += int(grad.abs().sum() > 0)
    Path(out).write_text(json.dumps({
        "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,
        "trainer_classes": [cls.__name__ for cls in type(trainer).__mro__],
        "rates_of": {name: sorted(rates) for name, rates in rates_of.items()},
        "largest_error": largest_error, "moved": moved}))


if __name__ == "__main__":
    gaudi_scenario(json.loads(sys.argv[1]), sys.argv[2])


def test_a_projector_inside_the_vision_tower_keeps_the_main_rate(family_models):
    # Qwen2.5-VL's projector (the merger) sits inside its vision tower: --vision_learning_rate must not reach it.
    from transformers import AutoModelForImageTextToText

    lora = script_args("--train_vision_tower", "--train_projector", "--vision_learning_rate", "0.25").lora
    model = AutoModelForImageTextToText.from_pretrained(family_models["qwen2_5_vl"])
    model = rlv.apply_lora(model, lora, rlv.MODEL_FAMILIES["qwen2_5_vl"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    rlv.split_learning_rate_groups(optimizer, model, rlv.part_learning_rates(model, lora, 0.5), 0.5)
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected = {name: 0.5 if ".merger." in name or ".visual." not in name else 0.25
                for name, p in model.named_parameters() if p.requires_grad}
    assert {name: rate_of[id(p)] for name, p in model.named_parameters() if p.requires_grad} == expected
    assert {0.5, 0.25} == set(expected.values()) and any(".merger." in name for name in expected)
