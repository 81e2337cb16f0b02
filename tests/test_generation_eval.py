# Licensed under the Apache License, Version 2.0 (the "License").
"""Generation metrics end to end, nothing scripted: each tiny family learns six chart rows by heart through the CLI,
then answers them through --generation_eval; predictions.jsonl, the metrics files and the TensorBoard tables are
checked row by row. And ranks agreeing with one process."""

import json
import os
import subprocess

import datasets
import pytest
import torch
from PIL import Image

import run_lora_vlm as rlv
import tiny_assets
from conftest import REPO_ROOT, launch_command, needs_mpirun, run_training, train_argv

FAMILIES = ["gemma3", "qwen2_5_vl", "llava_next"]
# Rows of tiny_assets.make_chart_rows(16, seed=0) in pairs that ask the same question about two charts and have
# different answers: a model answers all six only by reading the images.
PAIRS = [(0, 15), (1, 4), (8, 11)]
# What each family's chat template writes around the turns (roles, markup, the default system prompt) and what its
# processor writes for an image: none of it belongs in a generated answer.
PROMPT_TEXT = {
    "gemma3": ["<bos>", "<start_of_turn>", "<end_of_turn>", "user", "model", "<start_of_image>", "<image_soft_token>"],
    "qwen2_5_vl": ["<|im_start|>", "<|im_end|>", "system", "You are a helpful assistant.", "user", "assistant",
                   "<|vision_start|>", "<|image_pad|>"],
    "llava_next": ["<s>", "</s>", "[INST]", "[/INST]", "<image>"],
}
SPLITS = {"eval_before": "val", "eval": "val", "predict": "test"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def chart_pairs(tmp_path_factory):
    """(the six rows, a save_to_disk folder holding them as its train, val and test splits alike)."""
    charts = tiny_assets.make_chart_rows(16, seed=0)
    rows = [charts[index] for pair in PAIRS for index in pair]
    for first, second in zip(rows[::2], rows[1::2]):
        assert first["query"] == second["query"] and first["label"] != second["label"]
    folder = tmp_path_factory.mktemp("chart_pairs") / "data"
    split = datasets.Dataset.from_list(rows, features=tiny_assets.chartqa_features())
    datasets.DatasetDict({"train": split, "val": split, "test": split}).save_to_disk(str(folder))
    return rows, str(folder)


@pytest.fixture(scope="module", params=FAMILIES)
def answered(request, chart_pairs, family_models, tmp_path_factory):
    """(family, rows, output folder, {evaluation: records of predictions.jsonl}) of one run: evaluate the untouched
    model, learn the rows, evaluate and predict them, with generation."""
    name = request.param
    rows, dataset = chart_pairs
    output_dir = tmp_path_factory.mktemp(f"{name}_generation")
    run_training(train_argv(
        {"model": family_models[name], "dataset": dataset}, output_dir,
        "--do_train", "--do_eval", "--do_predict", "--generation_eval", "--eval_before_training",
        # By heart: every row in every step, a constant high learning rate, no dropout. All three families answer
        # every row after 30 steps; 40 leave room.
        "--per_device_train_batch_size", "6", "--max_steps", "40", "--learning_rate", "5e-3",
        "--lr_scheduler_type", "constant", "--lora_dropout", "0",
        # Two generation batches (4 + 2 rows), each left-padding prompts of different lengths.
        "--per_device_eval_batch_size", "4", "--generation_max_new_tokens", "8",
        "--report_to", "tensorboard", "--logging_dir", str(output_dir / "runs"),
    ))
    records = read_jsonl(output_dir / "predictions.jsonl")
    by_evaluation = {evaluation: [r for r in records if r["evaluation"] == evaluation] for evaluation in SPLITS}
    assert sum(map(len, by_evaluation.values())) == len(records)
    return name, rows, output_dir, by_evaluation


def test_every_row_is_answered_once_and_the_learnt_answers_are_the_gold_ones(answered):
    name, rows, _, by_evaluation = answered
    for evaluation, records in by_evaluation.items():
        assert [(r["split"], r["row_index"]) for r in records] == [(SPLITS[evaluation], i) for i in range(len(rows))]
        for record, row in zip(records, rows):
            assert record["question"] == row["query"] and record["gold_answers"] == row["label"]
            assert record["human_or_machine"] == row["human_or_machine"]
            # The scored answer is the generated text stripped (README: Evaluation), before training too.
            assert record["prediction"] == record["generated"].strip()
            assert record["exact_match"] == float(record["prediction"].lower() == row["label"][0].lower())
            if evaluation == "eval_before":
                continue
            leaked = [text for text in [row["query"], *PROMPT_TEXT[name]] if text in record["generated"]]
            assert not leaked, (evaluation, record)
            assert record["generated"] == row["label"][0], (evaluation, record)
            assert {k: record[k] for k in rlv.METRIC_NAMES} == {k: 1.0 for k in rlv.METRIC_NAMES}


def test_metrics_files_agree_with_the_records(answered):
    _, rows, output_dir, by_evaluation = answered
    evaluation_results = json.loads((output_dir / "eval_results.json").read_text())
    results = {**evaluation_results, **json.loads((output_dir / "predict_results.json").read_text())}
    groups = sorted({str(row["human_or_machine"]) for row in rows})
    assert groups == ["0", "1"]
    for evaluation, records in by_evaluation.items():
        expected = {}
        for metric in rlv.METRIC_NAMES:
            expected[f"{evaluation}_{metric}"] = sum(r[metric] for r in records) / len(records)
            for group in groups:
                scores = [r[metric] for r in records if str(r["human_or_machine"]) == group]
                expected[f"{evaluation}_{metric}_{group}"] = sum(scores) / len(scores)
        reported = {key: value for key, value in results.items() if key.startswith(f"{evaluation}_")
                    and key.removeprefix(f"{evaluation}_").startswith(tuple(rlv.METRIC_NAMES))}
        assert reported == pytest.approx(expected), evaluation
    assert evaluation_results["eval_samples"] == results["predict_samples"] == len(rows)
    assert evaluation_results["eval_before_loss"] > evaluation_results["eval_loss"]


def test_tensorboard_tables_show_the_same_rows_before_and_after(answered):
    _, _, output_dir, by_evaluation = answered
    tables = tensorboard_texts(output_dir / "runs")
    assert {tag for tag in tables if tag.endswith("/predictions")} == {f"{e}/predictions" for e in SPLITS}
    for evaluation, records in by_evaluation.items():
        # Not splitlines(): the untouched model's answers may hold other line breaks (\x1c, \x85, ...).
        lines = tables[f"{evaluation}/predictions"].rstrip("\n").split("\n")
        assert lines[0] == "| row | question | gold answers | prediction | relaxed accuracy | ANLS |"
        for line, record in zip(lines[2:], records, strict=True):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            assert cells[0] == str(record["row_index"]) and cells[1] == record["question"]
            if evaluation != "eval_before":  # there, an answer may hold "|" (escaped in the table)
                assert cells[2:] == [" / ".join(record["gold_answers"]), record["prediction"], "1", "1.00"]


def tensorboard_texts(log_dir) -> dict:
    """{tag: text} of every text summary written under `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"tensors": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            if tag.endswith("/text_summary"):
                value = accumulator.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
                texts[tag.removesuffix("/text_summary")] = value
    return texts


@needs_mpirun
def test_two_mpi_ranks_gather_the_same_generation_metrics_as_one_process(assets, tmp_path):
    flags = ["--do_eval", "--generation_eval", "--max_eval_samples", "6", "--per_device_eval_batch_size", "1",
             "--generation_max_new_tokens", "4"]
    # Both sides single-threaded, so the arithmetic is the same and greedy decoding of this random model cannot
    # flip between near-equal tokens: the ranks through the launcher, the reference in this process.
    command = launch_command(2, REPO_ROOT / "run_lora_vlm.py", *train_argv(assets, tmp_path / "two", *flags))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(train_argv(assets, tmp_path / "one", *flags))
    finally:
        torch.set_num_threads(threads)
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    for name in ("eval_relaxed_accuracy", "eval_exact_match", "eval_anls", "eval_samples"):
        assert two[name] == one[name], name
    assert read_jsonl(tmp_path / "two" / "predictions.jsonl") == read_jsonl(tmp_path / "one" / "predictions.jsonl")


def test_one_question_attends_and_generates_as_evaluation_does(assets, tmp_path, monkeypatch, capsys):
    """--predict_image goes through the same Gaudi wiring as --generation_eval: the reference attention on the model
    (on Gaudi, optimum-habana's Gemma 3 port answers as upstream then: test_gaudi_gemma3_attention.py) and the HPU
    generate() options, recorded here on CPU (the options stood in for by a harmless one generate() takes)."""
    seen = {"reference_attention": [], "options": []}
    use_reference, generation_model = rlv.use_gemma3_reference_attention, rlv.hpu_generation_model
    monkeypatch.setattr(rlv, "use_gemma3_reference_attention",
                        lambda model, args: seen["reference_attention"].append(model) or use_reference(model, args))
    monkeypatch.setattr(rlv, "hpu_generation_options", lambda args: {"num_beams": 1})
    monkeypatch.setattr(rlv, "hpu_generation_model",
                        lambda model, options: seen["options"].append(options) or generation_model(model, options))
    image = tmp_path / "chart.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    argv = ["--model_name_or_path", assets["model"], "--output_dir", str(tmp_path / "out"), "--predict_image",
            str(image), "--predict_question", "Which bar?", "--generation_max_new_tokens", "2"]
    assert rlv.cli(argv) == 0, capsys.readouterr().err[-2000:]
    assert len(seen["reference_attention"]) == 1 and seen["options"] == [{"num_beams": 1}]


def test_hpu_generation_options_are_none_where_gaudi_arguments_run_on_cpu():
    from types import SimpleNamespace

    gaudi = dict(use_habana=True, use_lazy_mode=True, use_hpu_graphs_for_inference=False)
    assert rlv.hpu_generation_options(SimpleNamespace(**gaudi, use_cpu=False)) == {
        "lazy_mode": True, "hpu_graphs": False, "static_shapes": True, "ignore_eos": False}
    # --use_cpu: GaudiTrainingArguments installs none of optimum-habana's generate(), which alone takes these.
    assert rlv.hpu_generation_options(SimpleNamespace(**gaudi, use_cpu=True)) == {}
