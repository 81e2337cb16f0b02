# Licensed under the Apache License, Version 2.0 (the "License").
"""The README's CPU example and its "Use the result" snippet, run as written (only `python` and the paths of the
repository's own files are made absolute, since the tests run in a temporary folder)."""

import contextlib
import io
import json
import re
import runpy
import shlex
import subprocess
import sys

import datasets

import run_lora_vlm as rlv
from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def readme_section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_set_up_and_test_commands_are_the_ones_ci_runs():
    assert "python -m pytest -q tests" in readme_section("Run the tests")
    assert "pip install -r requirements.txt -r tests/requirements.txt" in readme_section("Set-up")
    assert "test_command='python -m pytest -q tests'" in (REPO_ROOT / ".ci" / "run").read_text()


def test_the_cpu_example_runs_as_written_and_prints_no_warning(tmp_path):
    section = "Try it on a CPU in about a minute, offline"
    command = next(line for line in readme_section(section).splitlines() if line.startswith("python tests/tiny_assets.py"))
    for script in ("tests/tiny_assets.py", "run_lora_vlm.py"):
        command = command.replace(f"python {script}", f"{sys.executable} {REPO_ROOT / script}")
    # Bytes, decoded without universal newlines: a progress bar redraws itself with "\r", not with new lines.
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, timeout=600)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    output = stdout + stderr
    assert result.returncode == 0, output[-3000:]
    assert not re.search(r"warn", output, re.IGNORECASE), [line for line in output.splitlines() if "warn" in line.lower()]
    assert (tmp_path / "out" / "tiny" / "adapter_model.safetensors").is_file()
    # Quiet: the script's own lines, progress and losses, then a summary naming the outputs and the main metrics.
    lines = stderr.split("\n")[:-1]
    training = stdout.split("\n", 3)[3] + stderr  # without the three paths tiny_assets.py prints
    assert training.count("\n") <= 30, training
    summary = lines[lines.index(next(line for line in lines if line.endswith("Done. Outputs:"))) + 1:]
    results = json.loads((tmp_path / "out" / "tiny" / "all_results.json").read_text())
    assert summary == [
        "  adapter      out/tiny/adapter_model.safetensors",
        "  metrics      out/tiny/all_results.json",
        f"  train_loss {results['train_loss']:.4f}, eval_loss {results['eval_loss']:.4f}, "
        f"eval_perplexity {results['eval_perplexity']:.4f}",
        f"  padding      train {100 * results['train_padding_fraction']:.1f}%, "
        f"eval {100 * results['eval_padding_fraction']:.1f}% of the tokens in the batches",
    ]
    # The figures the README shows are this run's (to the second decimal: BLAS may round differently elsewhere).
    shown = re.search(r"train_loss ([\d.]+), eval_loss ([\d.]+)", readme_section(section)).groups()
    assert [round(float(value), 2) for value in shown] == [round(results["train_loss"], 2),
                                                           round(results["eval_loss"], 2)]


def test_the_one_question_example_answers_in_one_line(assets, tmp_path, monkeypatch, capsys, caplog):
    # On the chart tiny_assets.py writes, with an adapter where the CPU example leaves one (run in this process: the
    # command line is the same, HF_HUB_OFFLINE=1 is set for every test).
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "gemma3").symlink_to(assets["model"])
    (tmp_path / "tiny" / "chart.png").symlink_to(assets["image"])
    assert rlv.cli([
        "--model_name_or_path", assets["model"], "--dataset_name", assets["dataset"], "--output_dir",
        str(tmp_path / "out" / "tiny"), "--do_train", "--max_steps", "1", "--report_to", "none",
        "--save_strategy", "no"]) == 0
    question = next(line for line in readme_section("Try it on a CPU in about a minute, offline").splitlines()
                    if "--predict_image" in line)
    words = shlex.split(question)
    assert words[:3] == ["HF_HUB_OFFLINE=1", "python", "run_lora_vlm.py"]
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert rlv.cli(words[3:]) == 0
    answer = capsys.readouterr().out
    assert len(answer.splitlines()) == 1 and answer.strip()
    assert "with the adapter in out/tiny" in caplog.text


def test_the_use_the_result_snippet_answers_with_the_trained_answer_and_one_bos(assets, tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", readme_section("Use the result"), re.DOTALL).group(1)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "gemma3").symlink_to(assets["model"])
    (tmp_path / "tiny" / "chartqa").symlink_to(assets["dataset"])
    # An adapter that has learnt the snippet's row (train row 0) by heart: its answer is then the trained one.
    assert rlv.cli([
        "--model_name_or_path", assets["model"], "--dataset_name", assets["dataset"], "--output_dir", str(tmp_path / "out" / "tiny"),
        "--do_train", "--max_train_samples", "1", "--per_device_train_batch_size", "1", "--max_steps", "12",
        "--learning_rate", "3e-2", "--report_to", "none", "--save_strategy", "no",
    ]) == 0
    (tmp_path / "snippet.py").write_text(snippet)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        namespace = runpy.run_path(str(tmp_path / "snippet.py"))
    gold = datasets.load_from_disk(assets["dataset"])["train"][0]["label"][0]
    assert printed.getvalue().strip() == gold
    bos = namespace["processor"].tokenizer.bos_token_id
    assert (namespace["inputs"]["input_ids"][0] == bos).sum() == 1
