# Licensed under the Apache License, Version 2.0 (the "License").
"""The collator trains on assistant tokens only: masks are spelled out token by token."""

import numpy as np
import pytest
import torch
from PIL import Image

import run_lora_vlm as rlv
from conftest import IGNORE_INDEX, make_collator, script_args, trained_runs

IGNORE = None  # a masked position in the hand-written expectations below


def qa_collator(processor, *flags, columns=("image", "question", "answer"), skipped_rows=None):
    """The collator for a dataset with these columns, under these command-line flags."""
    return make_collator(processor, script_args(*flags).data, columns, skipped_rows=skipped_rows)


def feature(row, index=0, split="train"):
    return {"row": row, "split": split, "row_index": index}


def tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def trained_tokens(processor, ids, labels):
    return [None if int(label) == IGNORE_INDEX else t for t, label in zip(tokens(processor, ids), labels)]


RED = Image.new("RGB", (40, 30), (255, 0, 0))
IMAGE_RUN = ["<start_of_image>"] + ["<image_soft_token>"] * 4 + ["<end_of_image>"]


def test_single_turn_mask_written_by_hand(processor):
    batch = qa_collator(processor)([feature({"image": RED, "question": "How many bars?", "answer": "3"})])
    expected_tokens = (
        ["<bos>", "<start_of_turn>", "user", "\n\n", "\n"] + IMAGE_RUN
        + ["\n\n", "How", "▁many", "▁bars", "?", "<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
        + ["3", "<end_of_turn>", "\n"]
    )
    expected_labels = [IGNORE] * 21 + ["3", "<end_of_turn>", IGNORE]
    assert tokens(processor, batch["input_ids"][0]) == expected_tokens
    assert trained_tokens(processor, batch["input_ids"][0], batch["labels"][0]) == expected_labels
    assert batch["attention_mask"].tolist() == [[1] * len(expected_tokens)]
    assert batch["token_type_ids"][0].tolist() == [0] * 6 + [1] * 4 + [0] * 14
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_same_tokens_and_pixels_as_a_bare_processor_call_with_a_single_bos(processor):
    rows = [
        {"image": RED, "question": "Which bar is the tallest?", "answer": "B"},
        {"image": Image.new("RGB", (64, 64), (0, 0, 255)), "question": "Value of A?", "answer": "12.5"},
    ]
    batch = qa_collator(processor)([feature(r, i) for i, r in enumerate(rows)])
    for i, row in enumerate(rows):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]},
        ]
        text = processor.apply_chat_template(messages, tokenize=False)
        bare = processor(text=text, images=[[row["image"]]], add_special_tokens=False, return_tensors="pt")
        n = bare["input_ids"].shape[1]
        assert batch["input_ids"][i, :n].tolist() == bare["input_ids"][0].tolist()
        assert batch["token_type_ids"][i, :n].tolist() == bare["token_type_ids"][0].tolist()
        assert torch.equal(batch["pixel_values"][i], bare["pixel_values"][0])
        assert (batch["input_ids"][i] == processor.tokenizer.bos_token_id).sum() == 1


def test_rows_are_right_padded_and_padding_is_never_trained(processor):
    rows = [
        {"image": RED, "question": "How many bars?", "answer": "3"},
        {"image": RED, "question": "How many bars are there in this chart?", "answer": "four"},
    ]
    batch = qa_collator(processor)([feature(r, i) for i, r in enumerate(rows)])
    short, long = (batch["attention_mask"].sum(1)).tolist()
    assert short < long == batch["input_ids"].shape[1]
    assert batch["input_ids"][0, short:].tolist() == [processor.tokenizer.pad_token_id] * (long - short)
    assert batch["labels"][0, short:].tolist() == [-100] * (long - short)
    assert batch["attention_mask"][0, short:].tolist() == [0] * (long - short)


def test_multi_turn_trains_every_assistant_turn_and_folds_the_system_prompt(processor):
    row = {
        "images": [RED],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
        ],
    }
    batch = qa_collator(processor, columns=("images", "messages"))([feature(row)])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\n")
    assert trained_runs(processor.tokenizer, ids, labels) == ["red<end_of_turn>", "yes<end_of_turn>"]


def test_max_seq_length_cuts_only_the_tail_of_the_last_answer(processor, tmp_path):
    row = {"image": RED, "question": "How many bars?", "answer": "three bars in all"}
    full = qa_collator(processor)([feature(row)])
    length = int(full["attention_mask"].sum())
    skipped = rlv.SkippedRows(str(tmp_path))
    cut = qa_collator(processor, "--max_seq_length", str(length - 2), skipped_rows=skipped)([feature(row, 5)])
    assert cut["input_ids"][0].tolist() == full["input_ids"][0, : length - 2].tolist()
    assert cut["labels"][0].tolist() == full["labels"][0, : length - 2].tolist()
    assert [(e["action"], e["row_index"], e["reason"]) for e in skipped.entries()] == [("truncated", 5, "answer_truncated")]


def test_a_row_whose_answer_cannot_fit_stops_the_run_naming_it(processor):
    row = {"image": RED, "question": "How many bars are there?", "answer": "3"}
    with pytest.raises(ValueError, match=r"Invalid val row 7: too_long: .*--invalid_rows skip"):
        qa_collator(processor, "--max_seq_length", "12")([feature(row, 7, "val")])


def test_skipped_rows_are_recorded_and_an_all_skipped_batch_trains_nothing(processor, tmp_path, assets):
    from transformers import AutoModelForImageTextToText

    skipped = rlv.SkippedRows(str(tmp_path), "skip")
    collator = qa_collator(processor, "--invalid_rows", "skip", skipped_rows=skipped)
    batch = collator([feature({"image": RED, "question": "Q?", "answer": "  "}, 3), feature({"image": None, "question": "Q?", "answer": "a"}, 4)])
    # As many rows as asked for, so a static batch shape holds, each a lone <bos> with nothing trained.
    assert batch["labels"].tolist() == [[IGNORE_INDEX], [IGNORE_INDEX]]
    assert batch["input_ids"].tolist() == [[processor.tokenizer.bos_token_id]] * 2
    report = skipped.write_report(str(tmp_path))
    assert report == {"skipped": {"empty_answer": 1, "image_missing": 1}, "truncated": {}}
    model = AutoModelForImageTextToText.from_pretrained(assets["model"])
    loss = rlv.causal_lm_loss(model(**{k: v for k, v in batch.items() if k not in ("labels", "row_ids")}), batch["labels"])
    loss.backward()
    assert loss.item() == 0.0
    # The loss is still connected to the weights (backward reached them), and every gradient is zero.
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and not any(g.any() for g in gradients)


def test_loss_is_the_mean_over_trained_tokens_and_uses_the_window_count():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 4]])
    expected = torch.nn.functional.cross_entropy(
        torch.stack([logits[0, 0], logits[0, 1], logits[1, 1], logits[1, 2]]), torch.tensor([1, 2, 3, 4])
    )
    assert torch.allclose(rlv.causal_lm_loss({"logits": logits}, labels), expected)
    assert torch.allclose(rlv.causal_lm_loss({"logits": logits}, labels, num_items_in_batch=8), expected / 2)


def test_trained_sample_rendering_marks_trained_tokens(processor):
    batch = qa_collator(processor)([feature({"image": RED, "question": "How many bars?", "answer": "3"})])
    shown = rlv.format_trained_tokens(processor.tokenizer, batch["input_ids"][0], batch["labels"][0])
    assert shown.endswith("<start_of_turn>model\n[[3<end_of_turn>]]\n")
    assert "<image_soft_token>×4" in shown


def test_assistant_labels_keep_tokens_starting_inside_spans():
    ids = np.array([10, 11, 12, 13, 14])
    starts = np.array([0, 3, 5, 9, 12])
    assert rlv.assistant_token_labels(ids, starts, [(5, 12)]).tolist() == [-100, -100, 12, 13, -100]
