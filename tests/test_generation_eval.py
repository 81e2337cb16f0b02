# Licensed under the Apache License, Version 2.0 (the "License").
"""Generation metrics end to end: predictions.jsonl, metrics files, and ranks agreeing with one process."""

import json
import os
import subprocess
import sys

import run_lora_vlm as rlv
from conftest import REPO_ROOT, train_argv


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_eval_predict_with_generation_writes_predictions_and_metrics(assets, tmp_path):
    rlv.main(train_argv(
        assets, tmp_path, "--do_train", "--do_eval", "--do_predict", "--generation_eval", "--eval_before_training",
        "--max_steps", "2", "--max_eval_samples", "5", "--generation_max_new_tokens", "4",
    ))
    records = read_jsonl(tmp_path / "predictions.jsonl")
    by_evaluation = {name: [r for r in records if r["evaluation"] == name] for name in ("eval_before", "eval", "predict")}
    assert [len(rows) for rows in by_evaluation.values()] == [5, 5, 5]
    assert [r["row_index"] for r in by_evaluation["eval"]] == [0, 1, 2, 3, 4]
    assert {r["split"] for r in by_evaluation["predict"]} == {"test"}
    for record in records:
        assert record["question"] and record["gold_answers"] and isinstance(record["prediction"], str)
        assert {k: record[k] for k in rlv.METRIC_NAMES} == rlv.score_prediction(record["prediction"], record["gold_answers"])
    evaluation = json.loads((tmp_path / "eval_results.json").read_text())
    expected = rlv.aggregate_scores(by_evaluation["eval"], "human_or_machine")
    assert {k: evaluation[f"eval_{k}"] for k in expected} == expected
    assert "eval_relaxed_accuracy_0" in evaluation or "eval_relaxed_accuracy_1" in evaluation
    assert "eval_before_loss" in evaluation and evaluation["eval_before_loss"] > evaluation["eval_loss"]
    prediction = json.loads((tmp_path / "predict_results.json").read_text())
    assert {"predict_loss", "predict_perplexity", "predict_relaxed_accuracy", "predict_anls"} <= set(prediction)


def test_two_mpi_ranks_gather_the_same_generation_metrics_as_one_process(assets, tmp_path):
    flags = ["--do_eval", "--generation_eval", "--max_eval_samples", "6", "--per_device_eval_batch_size", "1",
             "--generation_max_new_tokens", "4"]
    # Both through the launcher with one thread per process, so the arithmetic is the same and greedy
    # decoding of this random model cannot flip between near-equal tokens.
    for world_size, name in ((1, "one"), (2, "two")):
        command = [sys.executable, str(REPO_ROOT / "gaudi_spawn.py"), "--world_size", str(world_size), "--use_mpi",
                   str(REPO_ROOT / "run_lora_vlm.py"), *train_argv(assets, tmp_path / name, *flags)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    for name in ("eval_relaxed_accuracy", "eval_exact_match", "eval_anls", "eval_samples"):
        assert two[name] == one[name], name
    assert read_jsonl(tmp_path / "two" / "predictions.jsonl") == read_jsonl(tmp_path / "one" / "predictions.jsonl")
