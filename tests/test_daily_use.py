# Licensed under the Apache License, Version 2.0 (the "License").
"""What users do in sequence: rerun a finished training asking for more, evaluate or merge a saved adapter, ask for
--help, point at a wrong path, keep data files beside an images/ folder. Each run goes through the real CLI entry."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import run_lora_vlm as rlv
from conftest import script_args, train_argv

# A training short enough for a test, strong enough to learn its two rows' answers by heart (see test_readme).
TRAIN_FLAGS = ["--do_train", "--do_eval", "--max_train_samples", "2", "--max_eval_samples", "4",
               "--per_device_train_batch_size", "2", "--max_steps", "12", "--learning_rate", "3e-2",
               "--save_strategy", "steps", "--save_steps", "6"]


def results(folder, name="eval_results.json") -> dict:
    return json.loads((Path(folder) / name).read_text())


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """(argv, output folder, eval_loss) of one finished training with checkpoints 6 and 12; tests copy the folder."""
    output_dir = tmp_path_factory.mktemp("finished") / "out"
    argv = train_argv(assets, output_dir, *TRAIN_FLAGS)
    assert rlv.cli(argv) == 0
    return argv, output_dir, results(output_dir)["eval_loss"]


@pytest.fixture(scope="module")
def base_eval_loss(assets, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("base") / "out"
    assert rlv.cli(train_argv(assets, output_dir, "--do_eval", "--max_eval_samples", "4")) == 0
    return results(output_dir)["eval_loss"]


def copy_of(folder, tmp_path, name="out"):
    return Path(shutil.copytree(folder, tmp_path / name))


def with_output_dir(argv, output_dir):
    argv = list(argv)
    argv[argv.index("--output_dir") + 1] = str(output_dir)
    return argv


def test_the_trained_model_differs_from_the_base_one(finished, base_eval_loss):
    # Without this, the tests below could not tell the trained adapter from the base model.
    assert abs(finished[2] - base_eval_loss) > 0.1


def test_a_finished_training_asked_for_more_evaluates_the_trained_adapter(finished, tmp_path, caplog):
    argv, trained_dir, trained_loss = finished
    output_dir = copy_of(trained_dir, tmp_path)
    adapter_before = (output_dir / "adapter_model.safetensors").read_bytes()
    assert rlv.cli(with_output_dir(argv, output_dir) + ["--do_predict", "--max_steps", "12"]) == 0
    assert results(output_dir)["eval_loss"] == trained_loss
    assert results(output_dir, "all_results.json")["eval_loss"] == trained_loss
    assert "predict_loss" in results(output_dir, "predict_results.json")
    # Not trained or saved again.
    assert (output_dir / "adapter_model.safetensors").read_bytes() == adapter_before
    assert f"with the adapter in {output_dir}" in caplog.text


def test_an_evaluation_without_training_uses_the_adapter_trained_in_the_output_dir(finished, tmp_path):
    argv, trained_dir, trained_loss = finished
    output_dir = copy_of(trained_dir, tmp_path)
    evaluate = [word for word in with_output_dir(argv, output_dir) if word != "--do_train"]
    assert rlv.cli(evaluate) == 0
    assert results(output_dir)["eval_loss"] == trained_loss


def test_adapter_path_with_do_eval_evaluates_that_adapter(assets, finished, tmp_path):
    _, trained_dir, trained_loss = finished
    argv = train_argv(assets, tmp_path / "out", "--do_eval", "--max_eval_samples", "4", "--adapter_path",
                      str(trained_dir))
    assert rlv.cli(argv) == 0
    assert results(tmp_path / "out")["eval_loss"] == trained_loss


def test_an_unfinished_training_is_evaluated_at_its_last_checkpoint(assets, finished, base_eval_loss, tmp_path):
    _, trained_dir, trained_loss = finished
    # Only the first checkpoint survived (the run was stopped there): that is the model to evaluate.
    (tmp_path / "out").mkdir()
    shutil.copytree(trained_dir / "checkpoint-6", tmp_path / "out" / "checkpoint-6")
    assert rlv.cli(train_argv(assets, tmp_path / "out", "--do_eval", "--max_eval_samples", "4")) == 0
    assert rlv.cli(train_argv(assets, tmp_path / "explicit", "--do_eval", "--max_eval_samples", "4",
                              "--adapter_path", str(trained_dir / "checkpoint-6"))) == 0
    at_checkpoint = results(tmp_path / "out")["eval_loss"]
    assert at_checkpoint == results(tmp_path / "explicit")["eval_loss"]
    assert at_checkpoint not in (trained_loss, base_eval_loss)


@pytest.mark.parametrize("added, named", [
    (("--train_projector",), r"model\.multi_modal_projector\.\S+ is new \(and 1 more\)"),
    (("--lora_rank", "8"), r"\S+\.lora_A\.weight has shape \[8, \d+\], not \[16, \d+\] \(and \d+ more\)"),
])
def test_resuming_with_other_trained_weights_is_one_line_and_changes_nothing(assets, finished, tmp_path, capsys,
                                                                            added, named):
    argv, trained_dir, _ = finished
    # A run stopped at its first checkpoint, rerun with a flag that changes what LoRA trains.
    (tmp_path / "out").mkdir()
    shutil.copytree(trained_dir / "checkpoint-6", tmp_path / "out" / "checkpoint-6")
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    rerun = [*train_argv(assets, tmp_path / "out", *TRAIN_FLAGS), *added]
    assert rlv.cli(rerun) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: \S+checkpoint-6 trained other weights than this command would \({named}\): resume "
                        r"with the LoRA flags it was trained with .*--overwrite_output_dir to start afresh\.", error)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before


def test_a_checkpoint_whose_adapter_file_holds_no_weights_is_resumed_unchecked(assets, tmp_path):
    """DeepSpeed ZeRO-3 checkpoints keep the weights in DeepSpeed's files and write an adapter file without tensors
    (transformers/trainer.py:3986): nothing to compare, so no refusal. The same model against a file with another
    shape is refused."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(assets["model"]),
                           LoraConfig(r=4, target_modules=["q_proj"]))
    for name, tensors in (("empty", {}), ("other", {"base_model.model.x.lora_A.weight": torch.zeros(2, 2)})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "adapter_model.safetensors"))
    rlv.check_checkpoint_trains_this_model(model, str(tmp_path / "empty"))
    with pytest.raises(rlv.UsageError, match=r"trained other weights than this command would \(\S+ is new"):
        rlv.check_checkpoint_trains_this_model(model, str(tmp_path / "other"))


def test_resuming_with_another_learning_rate_says_the_checkpoint_rates_go_on(assets, finished, tmp_path, caplog):
    argv, trained_dir, _ = finished

    def learning_rates(folder):
        history = results(folder, "trainer_state.json")["log_history"]
        return {entry["step"]: entry["learning_rate"] for entry in history if "learning_rate" in entry}

    for name, extra in (("same", ()), ("changed", ("--learning_rate", "1e-2"))):
        (tmp_path / name).mkdir()
        shutil.copytree(trained_dir / "checkpoint-6", tmp_path / name / "checkpoint-6")
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert rlv.cli([*train_argv(assets, tmp_path / name, *TRAIN_FLAGS), *extra]) == 0
        warned = [r.getMessage() for r in caplog.records if "learning rates" in r.getMessage()]
        if name == "same":
            assert warned == []
        else:
            assert warned == [f"Resuming from {tmp_path / name / 'checkpoint-6'}: its learning rates (0.03) go on, as "
                              "the Trainer restores its scheduler; this command's (0.01) apply to a fresh start only "
                              "(--overwrite_output_dir)."]
        # What the warning says: steps 7-12 run at the uninterrupted run's rates.
        assert learning_rates(tmp_path / name) == learning_rates(trained_dir)


def test_nothing_trained_evaluates_the_base_model_and_says_so(assets, base_eval_loss, tmp_path, caplog):
    assert rlv.cli(train_argv(assets, tmp_path / "out", "--do_eval", "--max_eval_samples", "4")) == 0
    assert results(tmp_path / "out")["eval_loss"] == base_eval_loss
    assert "without an adapter" in caplog.text


def weights(model_dir) -> dict:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()


def merged_expectation(base_dir, adapter_dir) -> dict:
    """base + (alpha / r) * B @ A for every adapted layer, computed from the saved files alone."""
    base = weights(base_dir)
    adapter = load_file(Path(adapter_dir, "adapter_model.safetensors"))
    config = json.loads(Path(adapter_dir, "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    expected = dict(base)
    for name in [n for n in adapter if n.endswith("lora_A.weight")]:
        layer = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = adapter[name.replace("lora_A", "lora_B")]
        expected[f"{layer}.weight"] = base[f"{layer}.weight"] + scale * (b @ adapter[name])
    return expected


@pytest.mark.parametrize("how", ["rerun of the training", "alone, from the output dir", "alone, from --adapter_path"])
def test_merge_writes_base_plus_the_trained_adapter(assets, finished, tmp_path, how):
    argv, trained_dir, _ = finished
    output_dir = copy_of(trained_dir, tmp_path)
    model_flags = ["--model_name_or_path", assets["model"], "--output_dir"]
    if how == "rerun of the training":
        command = with_output_dir(argv, output_dir) + ["--merge_adapter"]
    elif how == "alone, from the output dir":
        command = model_flags + [str(output_dir), "--merge_adapter"]
    else:
        output_dir = tmp_path / "elsewhere"
        command = model_flags + [str(output_dir), "--merge_adapter", "--adapter_path", str(trained_dir)]
    assert rlv.cli(command) == 0
    merged = weights(output_dir / "merged")
    expected, base = merged_expectation(assets["model"], trained_dir), weights(assets["model"])
    assert merged.keys() == expected.keys()
    assert sum(not torch.equal(expected[name], base[name]) for name in expected) == 14  # 7 projections x 2 layers
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_merge_with_nothing_to_merge_is_one_line(assets, tmp_path, capsys):
    assert rlv.cli(["--model_name_or_path", assets["model"], "--output_dir", str(tmp_path), "--merge_adapter"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --merge_adapter: nothing to merge") and err.count("\n") == 1


@pytest.mark.parametrize("source", ["--output_dir", "--adapter_path"])
def test_one_question_uses_the_trained_adapter(assets, finished, tmp_path, capsys, source):
    _, trained_dir, _ = finished
    row = datasets.load_from_disk(assets["dataset"])["train"][0]
    image = tmp_path / "chart.png"
    row["image"].save(image)
    question = ["--model_name_or_path", assets["model"], "--predict_image", str(image), "--predict_question",
                row["query"]]
    assert rlv.cli(question + ["--output_dir", str(tmp_path / "empty")]) == 0
    base_answer = capsys.readouterr().out.strip()
    assert rlv.cli(question + [source, str(trained_dir)]) == 0
    assert capsys.readouterr().out.strip() == row["label"][0] != base_answer


def test_adapter_path_with_training_is_refused(assets, finished, tmp_path, capsys):
    argv = train_argv(assets, tmp_path / "out", "--do_train", "--adapter_path", str(finished[1]))
    assert rlv.cli(argv) == 2
    assert capsys.readouterr().err.startswith("error: --adapter_path names an adapter")


# Which adapter a run that does not train uses, for every state of --output_dir: a table of units (no model loads).
def finished_training(folder: Path):
    for path in (folder, folder / "checkpoint-6", folder / "checkpoint-12"):
        path.mkdir(parents=True, exist_ok=True)
        (path / "adapter_config.json").write_text("{}")
    (folder / "checkpoint-6" / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    (folder / "checkpoint-12" / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 12}))
    (folder / "train_results.json").write_text("{}")


def resumable_checkpoint(folder: Path):
    (folder / "checkpoint-6").mkdir(parents=True)
    (folder / "checkpoint-6" / "adapter_config.json").write_text("{}")
    (folder / "checkpoint-6" / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    (folder / "checkpoint-9").mkdir()  # cut short while being written: passed over
    (folder / "checkpoint-9" / "adapter_config.json").write_text("{}")


def longer_training_resumed_past_the_saved_one(folder: Path):
    finished_training(folder)
    (folder / "checkpoint-18").mkdir()
    (folder / "checkpoint-18" / "adapter_config.json").write_text("{}")
    (folder / "checkpoint-18" / "trainer_state.json").write_text(json.dumps({"global_step": 18}))


STATES = {"finished training": (finished_training, ""), "resumable checkpoint": (resumable_checkpoint, "checkpoint-6"),
          "newer checkpoint": (longer_training_resumed_past_the_saved_one, "checkpoint-18"),
          "nothing": (lambda folder: folder.mkdir(), None)}
MODES = {"--do_eval": ["--do_eval"], "--do_predict": ["--do_predict"],
         "--generation_eval": ["--do_eval", "--generation_eval"], "--merge_adapter": ["--merge_adapter"],
         "--predict_question": ["--predict_image", "chart.png", "--predict_question", "Which bar?"]}


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("adapter_path", [False, True])
def test_the_adapter_each_run_uses(tmp_path, state, mode, adapter_path):
    build, expected = STATES[state]
    build(tmp_path / "out")
    flags = MODES[mode] + (["--adapter_path", "given-adapter"] if adapter_path else [])
    args = script_args(*flags, output_dir=tmp_path / "out")
    if adapter_path:
        assert rlv.adapter_for_run(args) == "given-adapter"
    elif expected is None and mode == "--merge_adapter":
        with pytest.raises(rlv.UsageError, match="nothing to merge"):
            rlv.adapter_for_run(args)
    else:
        assert rlv.adapter_for_run(args) == (None if expected is None else str(tmp_path / "out" / expected))
    # --overwrite_output_dir starts afresh: what the folder holds is not used.
    if not adapter_path and mode != "--merge_adapter":
        assert rlv.adapter_for_run(script_args(*flags, "--overwrite_output_dir", output_dir=tmp_path / "out")) is None


def test_a_finished_training_is_not_trained_again(assets, finished):
    argv, output_dir, _ = finished
    args = rlv.parse_args(argv)
    assert rlv.training_finished(args.training)
    assert not rlv.training_finished(rlv.parse_args(argv + ["--max_steps", "18"]).training)


# --help
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_flag_with_its_help_and_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rlv.cli([flag])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for group in (rlv.ModelArguments, rlv.DataArguments, rlv.LoraArguments, rlv.EvaluationArguments,
                  rlv.RunArguments, rlv.PortableTrainingArguments):
        for item in dataclasses.fields(group):
            if item.init:
                assert f"--{item.name}" in printed, item.name
    # A help text with a literal % (argparse formats help with %), rendered as written.
    assert "% of train held out" in printed


# Path mistakes: one line naming the path, exit 2, before any model or data loads.
PATH_MISTAKES = {
    "model folder missing": (["--model_name_or_path", "{tmp}/no-such-model"],
                             "--model_name_or_path {tmp}/no-such-model: no such folder"),
    "model id not cached offline": (["--model_name_or_path", "someone/no-such-model"],
                                    "--model_name_or_path someone/no-such-model: no such local folder, and "
                                    "HF_HUB_OFFLINE=1"),
    "model folder without a config": (["--model_name_or_path", "{tmp}"],
                                      "--model_name_or_path {tmp}: the folder holds no config.json"),
    "adapter folder missing": (["--adapter_path", "./no-such-adapter", "--do_eval"],
                               "--adapter_path ./no-such-adapter: no such folder"),
    "adapter folder without an adapter": (["--adapter_path", "{tmp}", "--do_eval"],
                                          "--adapter_path {tmp}: the folder holds no adapter_config.json"),
    "dataset path missing": (["--dataset_name", "{tmp}/data/train.jsonl"],
                             "--dataset_name {tmp}/data/train.jsonl: no such file or folder"),
    # Also the shape of a Hub id, but a data file's name: never sent to the Hub.
    "dataset file missing, relative": (["--dataset_name", "no-such-folder/train.jsonl"],
                                       "--dataset_name no-such-folder/train.jsonl: no such file or folder"),
    "image missing": (["--predict_image", "{tmp}/chart.png", "--predict_question", "Which?"],
                      "--predict_image {tmp}/chart.png: no such file"),
    "checkpoint missing": (["--resume_from_checkpoint", "{tmp}/checkpoint-5"],
                           "--resume_from_checkpoint {tmp}/checkpoint-5: no such folder"),
}


@pytest.mark.parametrize("mistake", list(PATH_MISTAKES))
def test_a_wrong_path_is_one_line_naming_it_before_anything_loads(assets, tmp_path, capsys, monkeypatch, mistake):
    for heavy in ("load_processor", "load_data", "load_model"):
        monkeypatch.setattr(rlv, heavy, lambda *args, name=heavy: pytest.fail(f"{name} ran before the path check"))
    flags, message = PATH_MISTAKES[mistake]
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    argv = ["--model_name_or_path", assets["model"], "--dataset_name", assets["dataset"], "--do_train",
            "--output_dir", str(tmp_path / "out"), *flags]
    if "--adapter_path" in flags:
        argv.remove("--do_train")
    assert rlv.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1, err


def test_a_hub_dataset_that_cannot_be_had_is_one_line(assets, tmp_path, capsys):
    argv = train_argv(assets, tmp_path / "out", "--do_train", dataset="someone/no-such-dataset")
    assert rlv.cli(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: --dataset_name someone/no-such-dataset: no such local file or folder, and the Hub")


# A data file beside an images/ folder.
def write_folder(folder: Path, data_name: str, rows, image_name="{index}.png") -> None:
    (folder / "images").mkdir(parents=True)
    lines = []
    for index, row in enumerate(rows):
        name = image_name.format(index=index)
        row["image"].save(folder / "images" / name)
        lines.append(json.dumps({"image": f"images/{name}", "question": row["query"], "answer": row["label"][0]}))
    (folder / data_name).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("data_name, image_name", [("train.jsonl", "{index}.png"), ("data.jsonl", "{index}.png"),
                                                   ("charts.jsonl", "train_{index}.png")])
def test_a_data_file_beside_an_images_folder_loads_the_file(chart_rows, tmp_path, data_name, image_name):
    write_folder(tmp_path / "data", data_name, chart_rows, image_name)
    args = script_args("--do_train", dataset=str(tmp_path / "data"))
    splits, schema, image_base_dir = rlv.load_data(args.data, args.training, None)
    assert schema.kind == "question_answer" and image_base_dir == tmp_path / "data"
    rows = splits["train"]
    assert [rows[i]["row"]["question"] for i in range(len(rows))] == [row["query"] for row in chart_rows]
    image = rlv.open_image(rows[1]["row"]["image"], image_base_dir)
    assert np.array_equal(np.asarray(image), np.asarray(chart_rows[1]["image"].convert("RGB")))


def test_a_folder_that_reads_two_ways_is_one_line_naming_both(chart_rows, tmp_path):
    write_folder(tmp_path / "data", "train.jsonl", chart_rows)
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps({"file_name": "images/0.png", "text": "x"}) + "\n")
    args = script_args("--do_train", dataset=str(tmp_path / "data"))
    with pytest.raises(rlv.UsageError, match=r"reads two ways: as data files \['train.jsonl'\], or as an image "
                                             r"folder described by \['metadata.jsonl'\]"):
        rlv.load_data(args.data, args.training, None)


def test_ctrl_c_outside_training_is_one_line_and_exit_130(assets, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises while the model loads

    monkeypatch.setattr(rlv, "load_model", interrupted)
    assert rlv.cli(train_argv(assets, tmp_path / "out", "--do_eval", "--max_eval_samples", "4")) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "error: interrupted (Ctrl-C)."


def test_a_tilde_the_shell_did_not_expand_is_the_home_folder(assets, tmp_path, monkeypatch):
    # "--flag=~/x" (or a JSON flags file) reaches the script with the "~" still in it.
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "model").symlink_to(assets["model"])
    (tmp_path / "data").symlink_to(assets["dataset"])
    argv = ["--model_name_or_path=~/model", "--dataset_name=~/data", "--output_dir", str(tmp_path / "out"),
            "--do_eval", "--max_eval_samples", "4", "--report_to", "none"]
    assert rlv.cli(argv) == 0
    assert results(tmp_path / "out")["eval_samples"] == 4
