# Licensed under the Apache License, Version 2.0 (the "License").
"""The CLI end to end on the tiny offline Gemma 3: train, evaluate, save, reload, resume."""

import json
import math
import runpy
import sys

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import run_lora_vlm as rlv
from conftest import REPO_ROOT, SEED_MODEL_FLAGS, SEED_SINGLE_CARD, run_training, train_argv

SEED_COMMAND = SEED_MODEL_FLAGS + SEED_SINGLE_CARD

@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One real training + evaluation run shared by the assertions below."""
    output_dir = tmp_path_factory.mktemp("trained")
    trainer = run_training(train_argv(assets, output_dir, "--do_train", "--do_eval", "--num_train_epochs", "2"))
    return trainer, output_dir


def test_training_writes_adapter_processor_and_finite_metrics(trained):
    _, output_dir = trained
    for name in ("adapter_model.safetensors", "adapter_config.json", "processor_config.json", "tokenizer.json",
                 "train_results.json", "eval_results.json", "all_results.json", "skipped_rows.json"):
        assert (output_dir / name).is_file(), name
    results = json.loads((output_dir / "all_results.json").read_text())
    assert math.isfinite(results["eval_loss"]) and math.isfinite(results["train_loss"])
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert json.loads((output_dir / "skipped_rows.json").read_text())["rows"] == []


def language_model_lora_names(assets) -> set:
    """The LoRA weights of every linear layer of every language-model layer (Gemma 3's module layout)."""
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(assets["model"]).text_config.num_hidden_layers
    linears = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return {f"base_model.model.model.language_model.layers.{i}.{linear}.lora_{ab}.default.weight"
            for i in range(layers) for linear in linears for ab in "AB"}


def test_lora_weights_changed_and_base_weights_did_not(trained, assets):
    trainer, _ = trained
    original = load_file(f"{assets['model']}/model.safetensors")
    state = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    lora_b = {k: v for k, v in state.items() if "lora_B" in k}
    assert set(lora_b) == {name for name in language_model_lora_names(assets) if "lora_B" in name}
    assert [k for k, v in lora_b.items() if v.abs().sum() == 0] == []  # lora_B starts at zero
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    for name, tensor in original.items():
        candidates = [k for k in base if k.endswith(name.split("model.", 1)[-1]) and base[k].shape == tensor.shape]
        assert candidates, name
        assert torch.equal(base[candidates[0]], tensor), name


def test_lora_targets_only_the_language_model(trained, assets):
    trainer, _ = trained
    adapted = {n for n, _ in trainer.model.named_parameters() if "lora_" in n}
    assert adapted == language_model_lora_names(assets)
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{suffix}.lora_A" in n for n in adapted), suffix
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == adapted


def test_saved_adapter_reloads_with_identical_logits(trained, assets):
    trainer, output_dir = trained
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "row_ids")}
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**inputs).logits
        base = AutoModelForImageTextToText.from_pretrained(assets["model"])
        reloaded = PeftModel.from_pretrained(base, str(output_dir)).eval()
        actual = reloaded(**inputs).logits
    assert torch.allclose(actual, expected, atol=1e-5)
    assert AutoProcessor.from_pretrained(str(output_dir)).chat_template == AutoProcessor.from_pretrained(
        assets["model"]).chat_template


def test_training_lowers_eval_loss_on_the_same_eval_set(trained, assets, tmp_path):
    _, output_dir = trained
    after = json.loads((output_dir / "eval_results.json").read_text())["eval_loss"]
    run_training(train_argv(assets, tmp_path, "--do_eval"))  # the untouched model: LoRA starts as identity
    before = json.loads((tmp_path / "eval_results.json").read_text())["eval_loss"]
    assert after < before - 0.5, (before, after)
    assert not (tmp_path / "adapter_config.json").exists()  # evaluation only: nothing trained, nothing saved


def test_seed_command_flags_parse_and_gaudi_flags_fail_clearly_without_gaudi():
    with pytest.raises(ValueError) as error:
        rlv.parse_args(SEED_COMMAND + ["--report_to", "tensorboard", "--logging_steps", "50", "--save_steps", "50"])
    message = str(error.value)
    assert "--use_habana" in message and "--use_lazy_mode" in message and "--gaudi_config_name" in message
    assert "Habana" in message and "drop these flags" in message


def test_the_same_flags_without_gaudi_ones_parse_into_stock_training_arguments():
    gaudi_only = {"--use_habana", "--use_lazy_mode", "--gaudi_config_name", "Habana/gpt2"}
    argv = [a for a in SEED_COMMAND if a not in gaudi_only] + ["--use_cpu"]  # transformers wants it for CPU bf16
    args = rlv.parse_args(argv)
    assert isinstance(args.training, transformers.TrainingArguments) and not hasattr(args.training, "use_habana")
    assert (args.model.model_name_or_path, args.data.max_train_samples, args.lora.lora_rank) == ("google/gemma-3-12b-it", 128, 16)
    assert args.training.bf16 is True and args.training.gradient_checkpointing is True
    # No accelerator here: images are prepared in the training process and host memory is not pinned (no warning).
    assert args.training.dataloader_num_workers == 0 and args.training.dataloader_pin_memory is False


def test_gaudi_flag_fails_before_any_model_loading_from_the_command_line(tmp_path, monkeypatch, capsys):
    """The script run as a program (its __main__ block, in this process): exit code 2 and one line, no traceback."""
    argv = [*SEED_MODEL_FLAGS, "--output_dir", str(tmp_path), "--use_habana"]
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / "run_lora_vlm.py"), *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO_ROOT / "run_lora_vlm.py"), run_name="__main__")
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "--use_habana need Intel Gaudi" in stderr
    # optimum-habana is installed here (requirements.txt); only Habana's bridge is missing, and the message says so.
    assert "but Habana's PyTorch bridge (habana_frameworks, from Habana's PyTorch container) is not installed" in stderr
    assert "unrecognized arguments" not in stderr and "Traceback" not in stderr


def test_one_json_file_replaces_the_flags(assets, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "model_name_or_path": assets["model"], "dataset_name": assets["dataset"], "output_dir": str(tmp_path / "out"),
        "lora_rank": 4, "lora_target_modules": ["q_proj", "v_proj"], "do_train": True, "max_steps": 1,
        "do_eval": True, "max_eval_samples": 4, "report_to": "none",
    }))
    assert rlv.cli([str(config)]) == 0
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["eval_samples"] == 4 and math.isfinite(results["eval_loss"])
    assert json.loads((tmp_path / "out" / "train_results.json").read_text())["train_samples"] == 64


def test_non_empty_output_dir_without_checkpoint_is_refused(assets, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        run_training(train_argv(assets, tmp_path, "--do_train"))


def test_rerunning_with_more_steps_continues_from_the_last_checkpoint(assets, tmp_path):
    argv = train_argv(assets, tmp_path, "--do_train", "--max_train_samples", "16", "--per_device_train_batch_size", "2",
                      "--save_strategy", "steps", "--save_steps", "2")
    first = run_training(argv + ["--max_steps", "4"])
    assert first.state.global_step == 4 and (tmp_path / "checkpoint-4").is_dir()
    second = run_training(argv + ["--max_steps", "6"])
    assert second.state.global_step == 6
    steps_logged = [entry["step"] for entry in second.state.log_history if "loss" in entry]
    assert steps_logged == [1, 2, 3, 4, 5, 6]  # the history continues the first run's


def test_max_samples_cut_first_or_seeded_random(assets, tmp_path):
    splits_first = prepare(assets, "--max_train_samples", "5", "--max_eval_samples", "3")
    assert splits_first["train"].row_indices.tolist() == [0, 1, 2, 3, 4]
    assert splits_first["eval"].row_indices.tolist() == [0, 1, 2] and splits_first["eval"].split == "val"
    random_a = prepare(assets, "--max_train_samples", "5", "--sample_selection", "random")["train"].row_indices
    random_b = prepare(assets, "--max_train_samples", "5", "--sample_selection", "random")["train"].row_indices
    assert random_a.tolist() == random_b.tolist() != [0, 1, 2, 3, 4]


def test_validation_is_carved_from_train_when_missing_and_is_seeded(assets, tmp_path):
    import datasets

    only_train = tmp_path / "only_train"
    datasets.load_from_disk(assets["dataset"])["train"].save_to_disk(str(only_train))
    a = prepare(assets, "--validation_split_percentage", "25", dataset=str(only_train))
    b = prepare(assets, "--validation_split_percentage", "25", dataset=str(only_train))
    assert len(a["eval"]) == 16 and len(a["train"]) == 48
    assert set(a["eval"].row_indices).isdisjoint(a["train"].row_indices)
    assert a["eval"].row_indices.tolist() == b["eval"].row_indices.tolist()


def prepare(assets, *flags, dataset=None):
    args = rlv.parse_args(
        ["--model_name_or_path", assets["model"], "--dataset_name", dataset or assets["dataset"],
         "--output_dir", "unused", "--do_train", "--do_eval", *flags]
    )
    raw, _ = rlv.load_raw_datasets(args.data, None)
    return rlv.prepare_splits(raw, args.data, args.training)


@pytest.mark.parametrize("template, message", [
    ("Q: {question} {foo}", "has a slot other than {question}"),
    ("Question please", "must contain a {question} slot"),
])
def test_a_bad_question_template_is_refused_at_start_up(template, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        rlv.DataArguments(dataset_name="d", question_template=template)


def test_rerunning_a_finished_command_changes_nothing(assets, tmp_path, capsys):
    # --max_steps with --num_train_epochs: the Trainer records the epochs it derived, not the flag's.
    argv = train_argv(assets, tmp_path, "--do_train", "--do_eval", "--max_train_samples", "16", "--max_eval_samples", "4",
                      "--save_strategy", "steps", "--save_steps", "100", "--num_train_epochs", "3", "--max_steps", "2")
    assert rlv.cli(argv) == 0
    assert (tmp_path / "checkpoint-2").is_dir()  # the final step's checkpoint
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert {"train_results.json", "all_results.json", "eval_results.json", "adapter_model.safetensors"} <= set(before)
    capsys.readouterr()
    assert rlv.cli(argv) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    # Asking for more of the finished run (a test split too): nothing is trained or saved again; the test is run.
    assert rlv.cli(argv + ["--do_predict", "--test_split", "test"]) == 0
    assert "nothing to do" not in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for name in ("train_results.json", "adapter_model.safetensors", "trainer_state.json"):
        assert after[name] == before[name], name
    assert json.loads(after["predict_results.json"])["predict_samples"] == 4
    # A longer schedule in the same folder is another training: it resumes and trains the extra step.
    assert run_training(argv + ["--max_steps", "3"]).state.global_step == 3


def test_flags_from_a_json_file_get_the_same_checks(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model_name_or_path": "m", "output_dir": str(tmp_path), "invalid_rows": "skpi"}))
    assert rlv.cli([str(config)]) == 2
    assert "argument --invalid_rows/--invalid-rows: invalid choice: 'skpi'" in capsys.readouterr().err
    config.write_text("{not json")
    assert rlv.cli([str(config)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {config}: cannot read the flags from it")


def test_dashed_flags_count_as_given(tmp_path):
    args = rlv.parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--train_vision_tower",
                           "--ddp-find-unused-parameters", "false"])
    assert args.training.ddp_find_unused_parameters is False  # the flag, as given, wins over the script's default


@pytest.mark.parametrize("flags, message", [
    (["--lora_rnak", "4"], "Unknown flag: --lora_rnak (did you mean --lora_rank?). See --help."),
    (["--lora_rank", "four"], "argument --lora_rank/--lora-rank: invalid int value: 'four'. See --help."),
    (["--padding_strategy", "shortest"], "argument --padding_strategy/--padding-strategy: invalid choice: 'shortest'"),
])
def test_flag_mistakes_print_one_line_and_exit_2(assets, tmp_path, capsys, flags, message):
    assert rlv.cli(train_argv(assets, tmp_path, "--do_train", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "Traceback" not in err


def test_a_broken_model_config_is_one_line_before_the_dataset_is_read(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rlv, "load_data", lambda *args: pytest.fail("the dataset was read before the model was checked"))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "gemma3",')  # cut short
    argv = ["--model_name_or_path", str(broken), "--dataset_name", assets["dataset"],
            "--output_dir", str(tmp_path / "out"), "--do_train"]
    assert rlv.cli(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: --model_name_or_path {broken}: cannot load its config")


def test_the_processor_loads_without_the_slow_processor_notice_and_with_the_checkpoints_pixels(assets):
    import logging

    from PIL import Image
    from transformers import AutoImageProcessor

    class Recorder(logging.Handler):
        messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    recorder = Recorder(level=logging.WARNING)
    library_logger = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root
    library_logger.addHandler(recorder)
    try:
        transformers.utils.logging.warning_once.cache_clear()  # shown once per process; earlier loads showed it
        AutoProcessor.from_pretrained(assets["model"])
        assert any("slow image processor" in m for m in recorder.messages)  # what a plain load says
        recorder.messages.clear()
        transformers.utils.logging.warning_once.cache_clear()
        _, _, processor = rlv.load_processor(rlv.ModelArguments(model_name_or_path=assets["model"]))
        assert recorder.messages == []
    finally:
        library_logger.removeHandler(recorder)
    # The same pixels as the image processor the checkpoint was saved with, asked for explicitly.
    saved = AutoImageProcessor.from_pretrained(assets["model"], use_fast=False)
    image = Image.new("RGB", (37, 23), (10, 200, 30))
    assert type(processor.image_processor) is type(saved)
    assert torch.equal(processor.image_processor(image, return_tensors="pt")["pixel_values"],
                       saved(image, return_tensors="pt")["pixel_values"])
    # The tokenizer stays the fast one, whose offsets the collator needs.
    assert processor.tokenizer.is_fast
