# Licensed under the Apache License, Version 2.0 (the "License").
"""Generation metrics end to end: predictions.jsonl, metrics files, and ranks agreeing with one process."""

import json
import os
import subprocess

import datasets
import pytest
import torch

import run_lora_vlm as rlv
from conftest import REPO_ROOT, launch_command, needs_mpirun, run_training, train_argv

WRONG_ANSWER = "zzzz"  # shares no character with any chart answer (digits, A-E, colour names, Yes/No)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def script_the_answers(monkeypatch):
    """Generation runs for real, but each batch's decoded text is replaced: the row's first gold answer (with
    surrounding spaces) at even positions, WRONG_ANSWER at odd ones, so that every score is known by hand."""
    golds_in_order = []
    generation_prompt, decode = rlv.ChatEncoder.generation_prompt, rlv.ChatEncoder.decode

    def recording_prompt(self, row):
        prompt = generation_prompt(self, row)
        golds_in_order.append(prompt[2])
        return prompt

    def scripted_decode(self, token_ids):
        generated = decode(self, token_ids)
        golds = [golds_in_order.pop(0) for _ in generated]
        return [f" {gold[0]} " if position % 2 == 0 else WRONG_ANSWER for position, gold in enumerate(golds)]

    monkeypatch.setattr(rlv.ChatEncoder, "generation_prompt", recording_prompt)
    monkeypatch.setattr(rlv.ChatEncoder, "decode", scripted_decode)


def test_train_eval_predict_with_generation_writes_predictions_and_metrics(assets, tmp_path, monkeypatch):
    script_the_answers(monkeypatch)
    run_training(train_argv(
        assets, tmp_path, "--do_train", "--do_eval", "--do_predict", "--generation_eval", "--eval_before_training",
        "--max_steps", "2", "--max_eval_samples", "5", "--generation_max_new_tokens", "4",
        "--report_to", "tensorboard", "--logging_dir", str(tmp_path / "runs"),
    ))
    data = datasets.load_from_disk(assets["dataset"])
    records = read_jsonl(tmp_path / "predictions.jsonl")
    by_evaluation = {name: [r for r in records if r["evaluation"] == name] for name in ("eval_before", "eval", "predict")}
    splits = {"eval_before": "val", "eval": "val", "predict": "test"}
    # One batch of 5 rows each time: rows 0, 2 and 4 answered right, 1 and 3 wrong.
    right = [True, False, True, False, True]
    for evaluation, rows in by_evaluation.items():
        gold_rows = data[splits[evaluation]]
        assert [(r["split"], r["row_index"]) for r in rows] == [(splits[evaluation], i) for i in range(5)]
        for index, record in enumerate(rows):
            golds = gold_rows[index]["label"]
            assert record["gold_answers"] == golds and record["question"] == gold_rows[index]["query"]
            assert record["generated"] == (f" {golds[0]} " if right[index] else WRONG_ANSWER)
            assert record["prediction"] == (golds[0] if right[index] else WRONG_ANSWER)
            expected = 1.0 if right[index] else 0.0
            assert {k: record[k] for k in rlv.METRIC_NAMES} == {k: expected for k in rlv.METRIC_NAMES}, record
            assert record["human_or_machine"] == gold_rows[index]["human_or_machine"]

    evaluation = json.loads((tmp_path / "eval_results.json").read_text())
    for name in rlv.METRIC_NAMES:
        assert evaluation[f"eval_{name}"] == pytest.approx(3 / 5) and evaluation[f"eval_before_{name}"] == pytest.approx(3 / 5)
    groups = {}
    for index in range(5):
        groups.setdefault(data["val"][index]["human_or_machine"], []).append(right[index])
    per_group = {key: value for key, value in evaluation.items()
                 if key.startswith("eval_") and not key.startswith("eval_before_") and key.rsplit("_", 1)[-1] in ("0", "1")}
    assert per_group == pytest.approx({
        f"eval_{name}_{group}": sum(outcomes) / len(outcomes) for name in rlv.METRIC_NAMES for group, outcomes in groups.items()
    })
    assert evaluation["eval_before_loss"] > evaluation["eval_loss"]
    prediction = json.loads((tmp_path / "predict_results.json").read_text())
    assert {"predict_loss", "predict_perplexity", "predict_anls"} <= set(prediction)
    assert prediction["predict_relaxed_accuracy"] == pytest.approx(3 / 5)
    # TensorBoard: the same rows' table before and after training, beside the curves.
    tables = tensorboard_texts(tmp_path / "runs")
    assert {tag for tag in tables if tag.endswith("/predictions")} == {"eval_before/predictions", "eval/predictions", "predict/predictions"}
    for evaluation in ("eval_before", "eval"):
        lines = tables[f"{evaluation}/predictions"].splitlines()
        assert lines[0] == "| row | question | gold answers | prediction | relaxed accuracy | ANLS |"
        for line, record in zip(lines[2:], by_evaluation[evaluation], strict=True):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            assert cells[0] == str(record["row_index"]) and cells[1] == record["question"]
            assert cells[3] == record["prediction"] and float(cells[4]) == record["relaxed_accuracy"]


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
