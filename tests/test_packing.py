# Licensed under the Apache License, Version 2.0 (the "License").
"""--packing: several whole rows per sequence, each attending only to itself (issue 23).

Checked here, per family, in float32 on the tiny models: a pack's per-token loss equals the mean over the same rows
run alone (each a batch of one, no padding: the plain model, independent of packing), and so do the LoRA gradients
of one step; a pack whose rows see each other (no row boundaries) does not. The packs themselves: whole rows, every
row once, at most the pack length, seeded. Through the CLI: a packed run reports its padding, and an evaluation of
the untouched model gives the same eval_loss packed and unpacked. The Gaudi port (FusedSDPA) with packs is checked in
test_gaudi_gemma3_attention.py.
"""

import json
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

import run_lora_vlm as rlv
from conftest import IGNORE_INDEX, make_collator, run_training, script_args, train_argv

# A float64 model, so that summation order (packed vs alone; which kernels the thread count picks) stays far below the
# bounds. LoRA gradients (up to about 6 here) within GRAD_RTOL of the largest reference gradient (measured: about
# 5e-16 relative; a float32 model reached 1e-5, too close to call). Losses (about 7) within ATOL: causal_lm_loss sums
# token losses in float32, as transformers does (measured: up to 4e-7).
ATOL = 5e-6
GRAD_RTOL = 1e-12
# What a pack whose rows see each other changes (measured: far above ATOL).
CLEARLY_DIFFERENT = 1e-3
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # random B: every LoRA weight gets a gradient
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj)")
NOT_MODEL_INPUTS = ("labels", "row_ids")


def test_packs_hold_whole_rows_every_row_once_within_the_length_seeded():
    lengths = np.random.default_rng(0).integers(1, 200, size=3000)
    packs = rlv.pack_rows(lengths, 256, seed=1, window=1024)
    rows = np.concatenate(packs)
    assert sorted(rows.tolist()) == list(range(3000))
    assert max(int(lengths[pack].sum()) for pack in packs) <= 256
    # Best fit within windows of 1024 shuffled rows: 3 windows, each nearly full packs (lower bound: total / 256).
    assert len(packs) <= int(np.ceil(lengths.sum() / 256)) + 3
    again, other = rlv.pack_rows(lengths, 256, seed=1), rlv.pack_rows(lengths, 256, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(packs, again)) and len(packs) == len(again)
    assert any(not np.array_equal(a, b) for a, b in zip(packs, other))
    # A window holds rows from its part of the shuffled order only.
    order = np.random.default_rng(1).permutation(3000)
    assert set(np.concatenate(packs[:5]).tolist()) <= set(order[:1024].tolist())
    padding = rlv.packing_padding(packs, lengths, 256)
    assert padding == 1 - lengths.sum() / (len(packs) * 256)


def test_pack_length_is_the_shortest_that_packs_within_the_target():
    lengths = np.array([80] * 4 + [48] * 4)
    # 80 tokens: every row alone, 20% padding; 96 and 112: 80 alone, 48 + 48, 11% and 24%; 128: 80 + 48 in every
    # pack, no padding.
    assert rlv.choose_packing_length(lengths, seed=0) == 128
    assert rlv.choose_packing_length(np.array([64] * 4 + [32] * 8), seed=0) == 64
    # Rows of 56: 64 leaves 12.5%, and so does every multiple of 64; 112 (not a round multiple of 64) holds two exactly.
    assert rlv.choose_packing_length(np.array([56] * 4), seed=0) == 112
    # Four rows of 41: no length up to 4 x 48 packs them within 3% (48, 96, 192: 14.6%; 128: three rows, then one
    # alone, 36%); the least padding is all four in one pack of 176 (6.8%).
    lengths = np.array([41] * 4)
    paddings = {n: rlv.packing_padding(rlv.pack_rows(lengths, n, 0), lengths, n) for n in range(48, 4 * 48 + 1, 16)}
    assert min(paddings.values()) > rlv.PACKING_PADDING_TARGET
    assert rlv.choose_packing_length(lengths, seed=0) == min(paddings, key=paddings.get) == 176


def _features(chart_rows):
    return [{"row": row, "split": "train", "row_index": index} for index, row in enumerate(chart_rows)]


def _lora_model(model_dir):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, torch_dtype=torch.float64)  # see ATOL
    return get_peft_model(model, LoraConfig(**LORA)).train()


def _packed_collator(model_dir, name, length):
    data_args = script_args("--packing").data
    data_args.packing_length = length
    config, family, processor = rlv.load_processor(rlv.ModelArguments(model_name_or_path=model_dir))
    collator = make_collator(processor, data_args, ["image", "query", "label"], family=name)
    collator.model_config = config
    return collator


def _alone(model, collator, features):
    """Each row run alone (a batch of one, nothing padded): the summed token losses, the trained tokens, and the
    per-row loss sums; backward on their per-token mean, the gradient of one step over these rows."""
    sums, counts = [], []
    model.zero_grad(set_to_none=True)
    batches = [collator([feature]) for feature in features]
    total = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches)
    for batch in batches:
        outputs = model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS})
        loss_sum = rlv.causal_lm_loss(outputs, rlv.labels_at_kept_positions(batch["labels"], batch["logits_to_keep"]),
                                      num_items_in_batch=1)
        (loss_sum / total).backward()
        sums.append(loss_sum.item())
        counts.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return sum(sums) / sum(counts), sums, grads


def _packed(model, batch):
    """A packed batch through the model as the trainer runs it: (per-token loss, per-row loss sums, LoRA gradients)."""
    model.zero_grad(set_to_none=True)
    outputs = model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS})
    labels = rlv.labels_at_kept_positions(batch["labels"], batch["logits_to_keep"])
    loss = rlv.causal_lm_loss(outputs, labels)
    loss.backward()
    token_losses, _ = rlv.next_token_losses(outputs, labels)
    targets = torch.nn.functional.pad(batch["row_ids"][:, 1:], (0, 1), value=-1)
    targets = targets.index_select(1, batch["logits_to_keep"])
    per_row = [token_losses[targets == row].sum().item() for row in range(int(batch["row_ids"].max()) + 1)]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), per_row, grads


def _max_grad_diff(grads, reference):
    assert grads.keys() == reference.keys() and len(reference) > 0
    return max((grads[n] - g).abs().max().item() for n, g in reference.items())


def _two_packs(model_dir, name, features):
    """(collator, batch) of two packs: three rows end to end with a little padding, and one row with much padding."""
    probe = _packed_collator(model_dir, name, 4096)
    lengths = [int((probe([[feature]])["row_ids"] >= 0).sum()) for feature in features]
    collator = _packed_collator(model_dir, name, sum(lengths[:3]) + 5)
    return collator, collator([features[:3], features[3:]])


@pytest.mark.parametrize("name", ["gemma3", "qwen2_5_vl", "llava_next"])
def test_a_pack_gives_the_loss_and_lora_gradients_of_its_rows_run_alone(name, family_models, chart_rows):
    model_dir = family_models[name]
    features = _features(chart_rows)
    model = _lora_model(model_dir)
    collator, batch = _two_packs(model_dir, name, features)
    assert len(batch["input_ids"]) == 2 and "attention_mask" not in batch
    assert (batch["row_ids"][0] == -1).sum() == 5 and batch["row_ids"][0].unique().tolist() == [-1, 0, 1, 2]
    reference_loss, reference_rows, reference_grads = _alone(model, collator, features)
    loss, rows, grads = _packed(model, batch)
    assert abs(loss - reference_loss) <= ATOL, (loss, reference_loss)
    assert np.allclose(rows, reference_rows, rtol=0, atol=ATOL), (rows, reference_rows)
    largest = max(g.abs().max().item() for g in reference_grads.values())
    difference = _max_grad_diff(grads, reference_grads)
    assert difference <= GRAD_RTOL * largest, (difference, largest)
    assert largest > 1e-3  # not all ~0


def test_a_pack_whose_rows_see_each_other_fails_parity(family_models, chart_rows):
    """The fidelity check itself: the same pack with the row boundaries dropped (an all-ones attention_mask, so
    transformers reads no rows from position_ids) gives other losses."""
    features = _features(chart_rows)
    model = _lora_model(family_models["gemma3"])
    collator, batch = _two_packs(family_models["gemma3"], "gemma3", features)
    reference_loss, reference_rows, _ = _alone(model, collator, features)
    leaking = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    loss, rows, _ = _packed(model, leaking)
    assert rows[0] == pytest.approx(reference_rows[0], abs=ATOL)  # the first row of a pack sees nothing earlier
    assert max(abs(a - b) for a, b in zip(rows, reference_rows)) > CLEARLY_DIFFERENT


def test_a_packed_run_reports_padding_and_evaluates_the_untouched_model_as_unpacked(assets, tmp_path):
    flags = ("--max_eval_samples", "8", "--max_train_samples", "16", "--per_device_eval_batch_size", "2")
    run_training(train_argv(assets, tmp_path / "packed", "--do_train", "--do_eval", "--eval_before_training",
                            "--max_steps", "2", "--per_device_train_batch_size", "2", "--packing", "--packing_length",
                            "32", *flags))
    run_training(train_argv(assets, tmp_path / "rows", "--do_eval", *flags))
    packed = json.loads((tmp_path / "packed" / "all_results.json").read_text())
    rows = json.loads((tmp_path / "rows" / "all_results.json").read_text())
    # LoRA starts as the identity: the evaluation before training is the untouched model's.
    assert packed["eval_before_loss"] == pytest.approx(rows["eval_loss"], rel=1e-5, abs=0)
    for results, key in ((packed, "train_padding_fraction"), (packed, "eval_padding_fraction"),
                         (rows, "eval_padding_fraction")):
        assert 0 <= results[key] < 1, (key, results[key])
    # The same packs before and after training; rows of 25-28 tokens, one per pack of 32, leave 4-7 tokens of
    # padding each; unpacked batches of two rows of 25-28 tokens, padded to the longer, at most 3 in 56.
    assert packed["eval_before_padding_fraction"] == packed["eval_padding_fraction"]
    for key in ("train_padding_fraction", "eval_padding_fraction"):
        assert 4 / 32 <= packed[key] <= 7 / 32, (key, packed[key])
    assert rows["eval_padding_fraction"] <= 3 / 56


def test_a_packed_run_stopped_and_resumed_trains_as_an_uninterrupted_one(assets, tmp_path, monkeypatch):
    import signal

    from interrupted_main import with_signal_at_step
    from safetensors.torch import load_file

    def argv(output_dir):
        return train_argv(assets, output_dir, "--do_train", "--packing", "--packing_length", "64",
                          "--max_train_samples", "16", "--per_device_train_batch_size", "1", "--max_steps", "4",
                          "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1")

    def losses(trainer):
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    uninterrupted = run_training(argv(tmp_path / "uninterrupted"))
    monkeypatch.setattr(rlv, "build_trainer", with_signal_at_step(rlv.build_trainer, 2, signal.SIGTERM))
    fallback = signal.signal(signal.SIGTERM, lambda signum, frame: pytest.fail("SIGTERM reached no handler"))
    try:
        with pytest.raises(SystemExit):
            run_training(argv(tmp_path / "resumed"))
    finally:
        signal.signal(signal.SIGTERM, fallback)
    monkeypatch.undo()
    resumed = run_training(argv(tmp_path / "resumed"))
    # The packs after the checkpoint are the ones the uninterrupted run trained on: the same losses and adapter.
    assert losses(resumed) == pytest.approx(losses(uninterrupted), rel=1e-5) and len(losses(resumed)) == 4
    a, b = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("resumed", "uninterrupted"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_dry_run_checks_packs_as_training_builds_them(assets, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(rlv, "load_model", lambda *a, **k: pytest.fail("the dry run loaded the model"))
    with caplog.at_level("INFO"):
        assert rlv.cli(train_argv(assets, tmp_path, "--do_train", "--dry_run_data", "2", "--packing", "--packing_length",
                                  "64", "--max_train_samples", "16", "--per_device_train_batch_size", "2")) == 0
    # Rows of 25-28 tokens, two to a pack of 64 (three would need 75): 2 batches of 2 packs hold 8 rows, one image each.
    assert "Packs of 64 tokens (train: 16 rows in 8 packs" in caplog.text
    assert "Dry run passed: {'batches': 2, 'rows': 8, 'images': 8}" in caplog.text


def test_the_dry_run_packs_qwen2_5_vl_rows(assets, family_models, tmp_path, monkeypatch, caplog):
    """Its packed positions come from the model's config (qwen2_5_vl_rope_positions), which the dry run loads."""
    monkeypatch.setattr(rlv, "load_model", lambda *a, **k: pytest.fail("the dry run loaded the model"))
    with caplog.at_level("INFO"):
        assert rlv.cli(train_argv(assets, tmp_path, "--model_name_or_path", family_models["qwen2_5_vl"], "--do_train",
                                  "--dry_run_data", "1", "--packing", "--max_train_samples", "16",
                                  "--per_device_train_batch_size", "1")) == 0
    packs = re.search(r"Packs of \d+ tokens \(train: 16 rows in (\d+) packs", caplog.text)
    rows = re.search(r"Dry run passed: \{'batches': 1, 'rows': (\d+), 'images': (\d+)\}", caplog.text)
    # 16 rows in fewer packs: the first pack holds several rows, one image each.
    assert packs and int(packs.group(1)) < 16 and rows, caplog.text[-2000:]
    assert int(rows.group(1)) == int(rows.group(2)) > 1


@pytest.mark.parametrize("flags, message", [
    (("--packing_length", "64"), r"^--packing_length sets the length of --packing's packs; add --packing"),
    (("--packing", "--packing_length", "0"), r"^--packing_length must be a positive integer, got 0"),
    (("--packing", "--validate_rows", "none"), r"^--packing fills packs from the rows' token lengths, which "
                                               r"--validate_rows none does not measure"),
    (("--packing", "--attn_implementation", "flash_attention_2", "--do_train", "--per_device_train_batch_size", "2"),
     r"^--packing with --attn_implementation flash_attention_2 needs --per_device_train_batch_size 1"),
])
def test_packing_flags_that_cannot_work_are_refused_in_one_line(flags, message):
    with pytest.raises(rlv.UsageError, match=message):
        script_args(*flags)


def test_flash_attention_packs_need_one_pack_per_batch_only_where_batches_are_made():
    # Training alone: the evaluation batch size (8 by default) makes no batch.
    args = script_args("--packing", "--attn_implementation", "flash_attention_2", "--do_train",
                       "--per_device_train_batch_size", "1")
    assert args.data.packing and args.training.per_device_eval_batch_size == 8


def _rows(lengths):
    return rlv.IndexedRows(None, "train", np.arange(len(lengths)), np.asarray(lengths), np.zeros(len(lengths), int))


def test_a_pack_length_shorter_than_a_row_and_packing_on_other_gaudi_ports_are_refused(processor, family_models):
    from types import SimpleNamespace

    columns = ["image", "query", "label"]
    cpu = SimpleNamespace(use_habana=False, use_cpu=False, seed=0)
    short = make_collator(processor, script_args("--packing", "--packing_length", "40").data, columns).encoder
    with pytest.raises(rlv.UsageError, match=r"^--packing_length 40 is shorter than the longest row \(50 tokens\)"):
        rlv.settle_packs(short, {"train": _rows([30, 50])}, cpu)
    qwen = rlv.load_processor(rlv.ModelArguments(model_name_or_path=family_models["qwen2_5_vl"]))[2]
    encoder = make_collator(qwen, script_args("--packing").data, columns, family="qwen2_5_vl").encoder
    gaudi = SimpleNamespace(use_habana=True, use_lazy_mode=True, use_cpu=False, seed=0)
    with pytest.raises(rlv.UsageError, match=r"^--packing on Gaudi keeps a pack's rows apart for Gemma 3 only"):
        rlv.settle_packs(encoder, {"train": _rows([30, 50])}, gaudi)
    rlv.settle_packs(encoder, {"train": _rows([30, 50])}, SimpleNamespace(use_habana=True, use_cpu=True, seed=0))
    gemma3 = make_collator(processor, script_args("--packing").data, columns).encoder
    splits = {"train": _rows([30, 50]), "eval": _rows([20, 20, 20, 20, 20])}
    rlv.settle_packs(gemma3, splits, gaudi)
    # From the training rows alone: 30 + 50 in one pack of 80 (with the evaluation rows, all in one pack of 192).
    assert gemma3.data_args.packing_length == 80 and len(splits["eval"].packs) == 2


def test_the_start_up_log_says_what_packing_would_leave_where_buckets_pad_much(processor, caplog):
    from types import SimpleNamespace

    training = SimpleNamespace(seed=0, per_device_train_batch_size=8)
    # Lengths spread from 20 to 1000 tokens: batches of 8 padded to buckets leave far more than 15%.
    lengths = np.random.default_rng(0).integers(20, 1000, size=400)
    encoder = make_collator(processor, script_args("--padding_strategy", "bucket").data, ["image", "query", "label"]
                            ).encoder
    with caplog.at_level("INFO", logger="run_lora_vlm"):
        rlv.settle_length_buckets(encoder, {"train": _rows(lengths)}, training)
    bucketed = float(re.search(r"about ([\d.]+)% padding in batches of 8", caplog.text).group(1))
    packed = float(re.search(r"--packing would leave about ([\d.]+)% padding here", caplog.text).group(1))
    assert bucketed > 15 and packed < 3
    # Little padding: no word of packing.
    caplog.clear()
    encoder.data_args.length_buckets = None
    with caplog.at_level("INFO", logger="run_lora_vlm"):
        rlv.settle_length_buckets(encoder, {"train": _rows([100] * 50)}, training)
    assert "Length buckets" in caplog.text and "--packing" not in caplog.text


def test_on_gaudi_every_pack_batch_has_one_shape_images_included(processor, chart_rows):
    """Packs of different rows, one or two images each: with gaudi_image_rows' bound for packs, every
    tensor of every batch has one shape (one lazy-mode graph); the blank images come after the real ones."""
    from types import SimpleNamespace

    collator = _packed_collator(processor.tokenizer.name_or_path, "gemma3", 96)
    features = _features(chart_rows)
    packs = [[features[:3]], [features[3:]]]  # three rows (three images), then one
    rows = rlv.IndexedRows(None, "train", np.arange(4), np.array([28, 28, 28, 28]), np.ones(4, int))
    rows.packs = [np.arange(3), np.arange(3, 4)]
    gaudi = SimpleNamespace(use_habana=True, use_lazy_mode=True, use_cpu=False)
    collator.image_rows = rlv.gaudi_image_rows(collator.encoder, {"train": rows}, gaudi)
    assert collator.image_rows.per_pack == 3
    batches = [collator(pack) for pack in packs]
    shapes = [{k: tuple(v.shape) for k, v in batch.items() if torch.is_tensor(v)} for batch in batches]
    assert shapes[0] == shapes[1] and shapes[0]["pixel_values"][0] == 3
    unpadded = _packed_collator(processor.tokenizer.name_or_path, "gemma3", 96)(packs[1])
    assert torch.equal(batches[1]["pixel_values"][:1], unpadded["pixel_values"])
    assert not batches[1]["pixel_values"][1:].any()
