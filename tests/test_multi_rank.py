# Licensed under the Apache License, Version 2.0 (the "License").
"""The training script as one of N real Open MPI ranks, launched by gaudi_spawn.py on CPU (gloo)."""

import json
import os
import subprocess

import pytest

from conftest import TESTS_DIR, launch_command, needs_mpirun, run_training, train_argv

pytestmark = needs_mpirun


def spawn(assets, output_dir, record_dir, world_size, *flags):
    command = launch_command(world_size, TESTS_DIR / "record_rows_main.py", "--record_dir", str(record_dir),
                             *train_argv(assets, output_dir, *flags))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(world_size)], result


def test_two_mpi_ranks_share_each_epoch_exactly_once_and_agree(assets, tmp_path):
    ranks, result = spawn(
        assets, tmp_path / "out", tmp_path / "record", 2,
        "--do_train", "--do_eval", "--max_train_samples", "12", "--max_eval_samples", "6",
        "--per_device_train_batch_size", "2", "--num_train_epochs", "2",
    )
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert [r["env_rank"] for r in ranks] == ["0", "1"]
    # The first collator call is the logged sample (rank 0 only); then every epoch of 12 rows.
    train_rows = [[tuple(x) for x in r["rows_seen"] if x[0] == "train"] for r in ranks]
    train_rows[0] = train_rows[0][1:]
    for epoch in range(2):
        per_epoch = [rows[epoch * 6:(epoch + 1) * 6] for rows in train_rows]
        assert sorted(per_epoch[0] + per_epoch[1]) == [("train", i) for i in range(12)], per_epoch
    assert ranks[0]["eval"]["eval_loss"] == ranks[1]["eval"]["eval_loss"]
    assert ranks[0]["lora"] == ranks[1]["lora"]
    output = tmp_path / "out"
    assert (output / "adapter_model.safetensors").is_file()
    assert json.loads((output / "all_results.json").read_text())["eval_loss"] == ranks[0]["eval"]["eval_loss"]
    assert "effective batch size 4" in result.stdout + result.stderr


def test_two_ranks_of_batch_one_train_like_one_rank_of_batch_two(assets, tmp_path):
    # At a rate of 0.5 the tiny model's 3 steps amplify rounding: the order of float sums alone (the thread count)
    # moves its LoRA weights by ~5e-3. At 0.05 it moves them by ~3e-6, while lora_B grows to ~0.2.
    flags = ("--do_train", "--max_train_samples", "8", "--max_steps", "3", "--lora_dropout", "0",
             "--optim", "sgd", "--learning_rate", "0.05", "--lr_scheduler_type", "constant", "--max_grad_norm", "0")
    two, _ = spawn(assets, tmp_path / "two", tmp_path / "record_two", 2, *flags, "--per_device_train_batch_size", "1")
    # The single rank in this process, recorded as record_rows_main.py records each rank.
    one = run_training(train_argv(assets, tmp_path / "one", *flags, "--per_device_train_batch_size", "2"))
    assert two[0]["losses"] == pytest.approx([e["loss"] for e in one.state.log_history if "loss" in e], rel=1e-4)
    lora = {k: v.detach().flatten()[:64].tolist() for k, v in one.model.state_dict().items() if "lora_" in k}
    assert lora.keys() == two[0]["lora"].keys()
    for name, values in lora.items():
        # Float32 all-reduce sums in another order than one local batch: equal up to rounding.
        assert two[0]["lora"][name] == pytest.approx(values, rel=1e-3, abs=1e-5), name


def test_a_rank_whose_whole_batch_is_skipped_neither_crashes_nor_hangs(assets, tmp_path):
    import datasets

    train = datasets.load_from_disk(assets["dataset"])["train"].select(range(8))
    # Rows 1, 3, 5, 7 have no answer; with batches of one row, each of them is a batch with nothing left in it.
    train = train.map(lambda row, i: {"label": [""] if i % 2 else row["label"]}, with_indices=True)
    data = tmp_path / "half_bad"
    datasets.DatasetDict({"train": train}).save_to_disk(str(data))
    # Without the start-up validation, the bad rows reach the collator and a rank's whole batch is skipped there.
    spawn_flags = ("--do_train", "--per_device_train_batch_size", "1", "--invalid_rows", "skip", "--num_train_epochs", "1",
                   "--validate_rows", "none")
    ranks, _ = spawn({**assets, "dataset": str(data)}, tmp_path / "out", tmp_path / "record", 2, *spawn_flags)
    report = json.loads((tmp_path / "out" / "skipped_rows.json").read_text())
    assert report["skipped_by_reason"] == {"empty_answer": 4}
    assert sorted(entry["row_index"] for entry in report["rows"]) == [1, 3, 5, 7]
    assert ranks[0]["lora"] == ranks[1]["lora"]  # both ranks took the same 4 steps
    assert len(ranks[0]["losses"]) == 4


def test_llava_next_trains_on_two_ranks_with_its_vision_tower_adapted(assets, family_models, tmp_path):
    """LLaVA-NeXT reads the second-to-last vision layer, so the last one's LoRA weights get no gradient: DDP must
    allow unused parameters. (Without --train_vision_tower no vision weight is adapted at all: test_model_families.)"""
    ranks, _ = spawn({**assets, "model": family_models["llava_next"]}, tmp_path / "out", tmp_path / "record", 2,
                     "--do_train", "--max_steps", "2", "--per_device_train_batch_size", "2", "--train_vision_tower")
    assert ranks[0]["lora"] == ranks[1]["lora"]
    assert any("vision_tower" in key for key in ranks[0]["lora"])
    assert len(ranks[0]["losses"]) == 2


def test_a_preempted_job_ends_only_once_rank_0_has_written_the_checkpoint(assets, tmp_path):
    """SIGTERM reaches both ranks at step 2 and rank 0 is slow to finish: no rank may exit (which can end an MPI
    job) before every rank has finished training, checkpoint included."""
    output_dir = tmp_path / "out"
    command = launch_command(2, TESTS_DIR / "interrupted_main.py", "--at_step", "2", "--signal", "TERM",
                             "--slow_rank", "0", *train_argv(assets, output_dir, "--do_train", "--max_train_samples",
                                                                  "16", "--per_device_train_batch_size", "2"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 143, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    # Each marker lists the markers written before it (tests/interrupted_main.py): an order, not clock readings.
    seen = {path.name: path.read_text().split() for path in output_dir.glob("rank*-*")}
    assert seen.get("rank0-finished") == ["rank1-finished"], seen  # rank 0 was the last to finish training
    assert "rank0-finished" in seen.get("rank1-exit", []), seen  # and rank 1 left only after that


def test_two_ranks_share_out_packs_and_evaluate_them_as_one_process_unpacked(assets, tmp_path):
    """--packing on two ranks: packs of two rows (64 tokens) shared out like rows, every training row once; the
    evaluation's 5 rows make 3 packs, fewer than two ranks' batches of 4, so accelerate repeats packs, within a
    batch too; each must count once."""
    flags = ("--max_eval_samples", "5", "--per_device_eval_batch_size", "4")
    ranks, _ = spawn(assets, tmp_path / "out", tmp_path / "record", 2, "--do_train", "--do_eval", "--packing",
                     "--packing_length", "64", "--max_train_samples", "12", "--per_device_train_batch_size", "1",
                     "--num_train_epochs", "1", *flags)
    train_rows = [[tuple(x) for x in r["rows_seen"] if x[0] == "train"] for r in ranks]
    train_rows[0] = train_rows[0][1:]  # the logged sample
    assert sorted(train_rows[0] + train_rows[1]) == [("train", i) for i in range(12)]
    assert len(train_rows[0]) == len(train_rows[1]) == 6
    assert ranks[0]["lora"] == ranks[1]["lora"]
    assert ranks[0]["eval"]["eval_loss"] == ranks[1]["eval"]["eval_loss"]
    # The trained adapter evaluated by one process, unpacked.
    one = run_training(train_argv(assets, tmp_path / "one", "--do_eval", "--adapter_path", str(tmp_path / "out"),
                                  *flags))
    unpacked = next(entry for entry in one.state.log_history if "eval_loss" in entry)["eval_loss"]
    assert ranks[0]["eval"]["eval_loss"] == pytest.approx(unpacked, rel=1e-5)
