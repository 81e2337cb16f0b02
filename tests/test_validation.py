# Licensed under the Apache License, Version 2.0 (the "License").
"""The start-up validation pass, bad rows the processor or template finds, and buckets chosen from the data.

Unit tests on RowChecker / validate_rows / the collator / choose_length_buckets in all three families, four short
CLI runs (a LLaVA-NeXT question holding `<image>`, and a 16-row set with 3 bad rows, each with --invalid_rows error
and skip) and one two-rank run of Qwen2.5-VL (no <bos>) whose batches are all skipped on one rank.
"""

import io
import itertools
import json
import random

import datasets
import numpy as np
import pytest
from PIL import Image

import run_lora_vlm as rlv
from conftest import needs_mpirun, train_argv

FAMILIES = ("gemma3", "qwen2_5_vl", "llava_next")
# What each family's processor reads as an image in text, and one more special token of its tokenizer.
IMAGE_MARKER = {"gemma3": "<start_of_image>", "qwen2_5_vl": "<|image_pad|>", "llava_next": "<image>"}
SPECIAL_TOKEN = {"gemma3": "<end_of_turn>", "qwen2_5_vl": "<|im_end|>", "llava_next": "</s>"}


@pytest.fixture(scope="module")
def models(assets, tmp_path_factory):
    """{family: (model folder, processor as the script loads it)}."""
    import tiny_llava_next
    import tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("families")
    folders = {
        "gemma3": assets["model"],
        "qwen2_5_vl": tiny_qwen2_5_vl.write_assets(str(root))["model"],
        "llava_next": tiny_llava_next.write_assets(str(root))["model"],
    }
    return {name: (path, rlv.load_processor(rlv.ModelArguments(model_name_or_path=path))[2]) for name, path in folders.items()}


def encoder_for(models, family, columns=("image", "question", "answer"), base_dir=None, **flags):
    data_args = rlv.DataArguments(dataset_name="rows", **flags)
    schema = rlv.detect_schema(list(columns), data_args)
    return rlv.ChatEncoder(models[family][1], rlv.MODEL_FAMILIES[family], schema, data_args, base_dir)


def encoded(width, height, colour=(200, 40, 40), fmt="PNG", orientation=None) -> dict:
    """An image as datasets stores it undecoded: {"bytes", "path"}."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.new("RGB", (width, height), colour).save(buffer, fmt, exif=exif)
    return {"bytes": buffer.getvalue(), "path": None}


def check(encoder, rows) -> dict:
    return rlv.RowChecker(encoder)({column: [row[column] for row in rows] for column in rows[0]})


def collated_lengths(encoder, rows) -> list[int]:
    collator = rlv.VisionChatCollator(encoder, encoder.data_args, rlv.SkippedRows(None))
    return [int(collator([{"row": row, "split": "train", "row_index": i}])["attention_mask"].sum()) for i, row in enumerate(rows)]


# --- lengths: measured from headers, equal to what the collator builds ------------------------------------------

QA_ROWS = [
    {"image": encoded(40, 30), "question": "How many bars?", "answer": "3"},
    {"image": encoded(90, 33), "question": "Which bar is the tallest one of them all?", "answer": "The blue one, left"},
    {"image": encoded(28, 130), "question": "Value?", "answer": "12.5"},
    {"image": encoded(300, 200), "question": "Is bar A taller than bar B?", "answer": "Yes"},
    # Stored 120x40, shown 40x120 once its EXIF orientation is applied: the header's size must be turned too.
    {"image": encoded(120, 40, fmt="JPEG", orientation=6), "question": "Turned?", "answer": "Yes"},
]
CHAT_ROWS = [
    {"images": [encoded(64, 48), encoded(33, 77)], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image> and <image>: which is taller?"},
        {"role": "assistant", "content": "The second."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes, quite sure."},
    ]},
]


@pytest.mark.parametrize("family", FAMILIES)
def test_measured_lengths_are_the_collators_without_decoding_pixels(family, models, monkeypatch):
    variants = [{}, {"fixed_image_size": [50, 70]}, {"system_prompt": "Answer briefly."}]
    if family == "qwen2_5_vl":
        variants.append({"image_max_pixels": 28 * 28 * 8})
    for flags in variants:
        for columns, rows in ((("image", "question", "answer"), QA_ROWS), (("images", "messages"), CHAT_ROWS)):
            encoder = encoder_for(models, family, columns, **flags)
            expected = collated_lengths(encoder, rows)
            # The checker reads headers only: decoding an image here would be a failure.
            with monkeypatch.context() as patched:
                patched.setattr(rlv, "open_image", lambda *a: pytest.fail("the validation pass decoded an image"))
                checked = check(encoder, rows)
            assert checked["reason"] == [""] * len(rows), (flags, checked)
            assert checked["length"] == expected, flags
    # Dynamic-resolution families give the turned image its turned size's token count.
    if family != "gemma3":
        plain = check(encoder_for(models, family), [dict(QA_ROWS[4], image=encoded(40, 120))])
        assert plain["length"] == check(encoder_for(models, family), [QA_ROWS[4]])["length"]


# --- bad rows: the same reason from the validation pass and from the collator, in every family -----------------


def bad_rows(family, folder) -> tuple[list[dict], list[str]]:
    (folder / "ok.png").write_bytes(encoded(40, 30)["bytes"])
    good = {"image": encoded(40, 30), "question": "How many bars?", "answer": "3"}
    rows = [
        good,
        dict(good, question=f"What does {IMAGE_MARKER[family]} show?"),
        dict(good, answer=f"A bar{SPECIAL_TOKEN[family]}"),
        dict(good, image={"bytes": b"\x89PNG\r\n\x1a\n not a PNG", "path": None}),
        dict(good, image={"bytes": None, "path": str(folder / "missing.png")}),
        dict(good, question=" ".join(["What is the value of bar B in this chart"] * 12) + "?"),
        dict(good, image={"bytes": None, "path": str(folder / "ok.png")}),
    ]
    reasons = ["", "image_placeholder_in_text", "special_token_in_text", "image_unreadable", "image_missing", "too_long", ""]
    return rows, reasons


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_rows_are_named_by_the_checker_and_the_collator_alike(family, models, tmp_path):
    rows, reasons = bad_rows(family, tmp_path)
    encoder = encoder_for(models, family, max_seq_length=80, invalid_rows="skip")
    assert check(encoder, rows)["reason"] == reasons
    skipped = rlv.SkippedRows(str(tmp_path / "out"), "skip")
    collator = rlv.VisionChatCollator(encoder, encoder.data_args, skipped)
    batch = collator([{"row": row, "split": "train", "row_index": i} for i, row in enumerate(rows)])
    assert batch["row_ids"].tolist() == [0, 6]
    assert [(e["row_index"], e["reason"]) for e in skipped.entries()] == [(i, r) for i, r in enumerate(reasons) if r]


def test_special_tokens_outside_the_templates_markup_are_text(models):
    """Qwen2.5-VL's grounding data writes boxes with <|box_start|> ... <|box_end|>: trained as they are."""
    row = dict(QA_ROWS[0], answer="<|box_start|>(10,20),(30,40)<|box_end|>")
    assert check(encoder_for(models, "qwen2_5_vl"), [row])["reason"] == [""]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_chat_that_starts_with_the_assistant_is_a_bad_row(family, models, tmp_path):
    row = {"images": [encoded(40, 30)], "messages": [
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "<image>What is it?"},
        {"role": "assistant", "content": "A bar."},
    ]}
    encoder = encoder_for(models, family, ("images", "messages"))
    assert check(encoder, [row])["reason"] == ["bad_conversation"]
    collator = rlv.VisionChatCollator(encoder, encoder.data_args, rlv.SkippedRows(None))
    with pytest.raises(rlv.UsageError, match=r"^Invalid train row 4: bad_conversation: the conversation starts with an assistant"):
        collator([{"row": row, "split": "train", "row_index": 4}])


def test_every_error_the_processor_raises_for_one_row_names_that_row(models, tmp_path):
    """Qwen2.5-VL's processor refuses an image over 200 times wider than high; LLaVA-NeXT's raises StopIteration
    for a surplus <image> (with the text check switched off to reach it): both are that row's fault."""
    qwen = encoder_for(models, "qwen2_5_vl", invalid_rows="skip")
    thin = {"image": encoded(250, 1), "question": "Thin?", "answer": "Yes"}
    assert check(qwen, [thin])["reason"] == ["processor_error"]
    llava = encoder_for(models, "llava_next", invalid_rows="skip")
    llava.reserved_text = rlv.re.compile(r"(?!x)x")  # matches nothing
    surplus = {"image": encoded(40, 30), "question": "What does <image> show?", "answer": "A bar"}
    good = {"image": encoded(40, 30), "question": "How many bars?", "answer": "3"}
    for encoder, bad in ((qwen, thin), (llava, surplus)):
        skipped = rlv.SkippedRows(str(tmp_path / type(encoder.processor).__name__), "skip")
        batch = rlv.VisionChatCollator(encoder, encoder.data_args, skipped)(
            [{"row": row, "split": "train", "row_index": i} for i, row in enumerate([good, bad, good])]
        )
        assert batch["row_ids"].tolist() == [0, 2]
        assert [(e["row_index"], e["reason"]) for e in skipped.entries()] == [(1, "processor_error")]
        strict = rlv.VisionChatCollator(encoder, rlv.DataArguments(dataset_name="rows"), rlv.SkippedRows(None))
        with pytest.raises(rlv.UsageError, match=r"Invalid train row 1: processor_error: the processor rejected it"):
            strict([{"row": row, "split": "train", "row_index": i} for i, row in enumerate([good, bad])])


def test_no_stop_iteration_leaves_the_collator(models, monkeypatch):
    encoder = encoder_for(models, "llava_next")
    collator = rlv.VisionChatCollator(encoder, encoder.data_args, rlv.SkippedRows(None))

    def stop(*args, **kwargs):
        raise StopIteration

    monkeypatch.setattr(rlv, "check_fits", stop)  # not the processor: no row is to blame
    with pytest.raises(RuntimeError, match=r"StopIteration while building the batch of \['train row 0'\]"):
        collator([{"row": QA_ROWS[0], "split": "train", "row_index": 0}])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next"])  # without a <bos>, and with one (Gemma 3: test_collator)
def test_a_fully_skipped_batch_trains_nothing(family, models):
    from transformers import AutoModelForImageTextToText

    encoder = encoder_for(models, family, invalid_rows="skip")
    collator = rlv.VisionChatCollator(encoder, encoder.data_args, rlv.SkippedRows(None, "skip"))
    bad = [{"row": dict(QA_ROWS[0], answer=" "), "split": "train", "row_index": i} for i in range(3)]
    batch = collator(bad)
    tokenizer = encoder.tokenizer
    stand_in = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    assert (family == "qwen2_5_vl") == (tokenizer.bos_token_id is None)
    assert batch["input_ids"].tolist() == [[stand_in]] * 3 and batch["labels"].tolist() == [[-100]] * 3
    model = AutoModelForImageTextToText.from_pretrained(models[family][0])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "row_ids")}
    loss = rlv.causal_lm_loss(model(**inputs), batch["labels"])
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in model.parameters())


# --- validate_rows: all bad rows at once, dropped up front, cached --------------------------------------------

TRAIN_ONLY = type("TrainingArgs", (), {
    "do_train": True, "do_eval": False, "do_predict": False, "seed": 0, "should_save": True,
    "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
    "main_process_first": staticmethod(lambda desc="": __import__("contextlib").nullcontext()),
})()


def jsonl_with_bad_rows(folder, count=16) -> tuple[str, dict]:
    """`count` rows with images by path; rows 3, 7 and 12 are bad, row 9's PNG is cut inside its pixel data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ok.png").write_bytes(encoded(40, 30)["bytes"])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a PNG")
    whole = encoded(64, 64, colour=(10, 200, 30))["bytes"]
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    rows = [{"image": "ok.png", "question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(count)]
    rows[3]["image"] = "corrupt.png"
    rows[7]["image"] = "nowhere.png"
    rows[12]["question"] = "What does <start_of_image> mean?"
    rows[9]["image"] = "cut.png"
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder / "data.jsonl"), {3: "image_unreadable", 7: "image_missing", 12: "image_placeholder_in_text"}


def load_splits(path, **flags):
    data_args = rlv.DataArguments(dataset_name=path, **flags)
    raw, base_dir = rlv.load_raw_datasets(data_args, None)
    return rlv.prepare_splits(raw, data_args, TRAIN_ONLY), data_args, base_dir


def validated(models, path, cache, tmp_path, **flags):
    splits, data_args, base_dir = load_splits(path, **flags)
    schema = rlv.detect_schema(splits["train"].dataset.column_names, data_args)
    encoder = rlv.ChatEncoder(models["gemma3"][1], rlv.MODEL_FAMILIES["gemma3"], schema, data_args, base_dir)
    skipped = rlv.SkippedRows(str(tmp_path / "out"), data_args.invalid_rows)
    return rlv.validate_rows(encoder, splits, skipped, TRAIN_ONLY, str(cache)), skipped, encoder


def test_all_bad_rows_are_reported_at_once_then_dropped_up_front_and_cached(models, tmp_path, monkeypatch):
    path, bad = jsonl_with_bad_rows(tmp_path / "data")
    cache = tmp_path / "cache"
    with pytest.raises(rlv.UsageError) as raised:
        validated(models, path, cache, tmp_path)
    message = str(raised.value)
    assert message.startswith("3 of 16 rows are invalid: ") and "\n" not in message
    for index, reason in bad.items():
        assert f"{reason} x1 (train row {index};" in message
    assert "--invalid_rows skip" in message

    # The same rows with --invalid_rows skip read the cached checks: no row is checked again.
    monkeypatch.setattr(rlv.RowChecker, "__call__", lambda *a: pytest.fail("checked again despite the cache"))
    splits, skipped, _ = validated(models, path, cache, tmp_path, invalid_rows="skip")
    kept = [i for i in range(16) if i not in bad]
    assert splits["train"].row_indices.tolist() == kept and len(splits["train"]) == 13
    assert [(e["row_index"], e["reason"]) for e in skipped.entries()] == sorted(bad.items())
    lengths = splits["train"].token_lengths
    assert len(lengths) == 13 and lengths.min() > 0

    # Only decoding finds row 9's cut pixel data: the collator still catches and counts it, per batch.
    monkeypatch.undo()
    splits, skipped, encoder = validated(models, path, cache, tmp_path, invalid_rows="skip")
    batch = rlv.VisionChatCollator(encoder, encoder.data_args, skipped)([splits["train"][p] for p in range(13)])
    assert 9 not in batch["row_ids"].tolist() and len(batch["row_ids"]) == 12
    assert (9, "image_unreadable") in [(e["row_index"], e["reason"]) for e in skipped.entries()]

    # An image file repaired on disk is checked anew, though the dataset itself did not change.
    (tmp_path / "data" / "corrupt.png").write_bytes(encoded(40, 30)["bytes"])
    splits, _, _ = validated(models, path, cache, tmp_path, invalid_rows="skip")
    assert 3 in splits["train"].row_indices.tolist() and len(splits["train"]) == 14


def test_validate_rows_none_checks_nothing_and_buckets_come_from_a_sample(models, tmp_path, monkeypatch):
    path, _ = jsonl_with_bad_rows(tmp_path / "data")
    monkeypatch.setattr(rlv, "check_split", lambda *a: pytest.fail("--validate_rows none checked the rows"))
    splits, _, encoder = validated(models, path, tmp_path / "cache", tmp_path, validate_rows="none",
                                   padding_strategy="bucket", max_seq_length=512)
    assert len(splits["train"]) == 16 and splits["train"].token_lengths is None
    rlv.settle_length_buckets(encoder, splits, TRAIN_ONLY)
    # The sample's longest row gets a bucket; an unmeasured row may be longer, so --max_seq_length is one too.
    longest = max(collated_lengths(encoder, [splits["train"][i]["row"] for i in range(16) if i not in (3, 7, 9, 12)]))
    buckets = encoder.data_args.length_buckets
    assert len(buckets) <= 4 and buckets[-1] == 512 and -(-longest // 16) * 16 in buckets


# --- buckets chosen from the data ---------------------------------------------------------------------------


def least_padding_by_brute_force(lengths, max_seq_length, max_buckets=4, multiple=16) -> int:
    """The least total padding over every set of bucket lengths, one row per batch, found by trying them all."""
    capped = [min(n, max_seq_length) for n in lengths]
    candidates = sorted({min(-(-n // multiple) * multiple, max_seq_length) for n in capped})
    best = None
    for count in range(1, max_buckets + 1):
        for buckets in itertools.combinations(candidates, count):
            if buckets[-1] != candidates[-1]:
                continue
            padding = sum(next(b for b in buckets if b >= n) - n for n in capped)
            best = padding if best is None else min(best, padding)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_chosen_buckets_pad_least(seed):
    rng = random.Random(seed)
    lengths = [int(rng.lognormvariate(5, 0.6)) + 1 for _ in range(rng.randint(5, 60))]
    max_seq_length = rng.choice([256, 300, 1024])
    buckets, _ = rlv.choose_length_buckets(np.array(lengths), max_seq_length, batch_size=1)
    capped = [min(n, max_seq_length) for n in lengths]
    assert len(buckets) <= 4 and buckets == sorted(set(buckets))
    assert all(b % 16 == 0 or b == max_seq_length for b in buckets) and buckets[-1] <= max_seq_length
    assert buckets[-1] >= max(capped) > buckets[-1] - 16 or buckets[-1] == max_seq_length
    padding = sum(next(b for b in buckets if b >= n) - n for n in capped)
    assert padding == least_padding_by_brute_force(lengths, max_seq_length)


def test_bigger_batches_move_buckets_up_and_a_sample_keeps_max_seq_length():
    lengths = np.array([100] * 50 + [200] * 50)
    assert rlv.choose_length_buckets(lengths, 1024, batch_size=1)[0] == [112, 208]
    # With batches of 8, nearly every batch holds a 200-token row: a 112 bucket would rarely be used.
    assert rlv.choose_length_buckets(lengths, 1024, batch_size=8, max_buckets=1)[0] == [208]
    assert rlv.choose_length_buckets(lengths, 1024, batch_size=1, longest=1024)[0] == [112, 208, 1024]


def chartqa_like_rows(tokenizer, count, seed=0) -> list[dict]:
    """ChartQA-shaped rows: questions of 5-40 words, answers of 1-4 words, one chart image each."""
    words = [w for w in "the a of bar bars chart value how many which what is are than in shows total colour".split()]
    rng = random.Random(seed)
    image = encoded(96, 64)
    return [
        {"image": image, "query": " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))).capitalize() + "?",
         "label": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))]}
        for _ in range(count)
    ]


def test_default_buckets_pad_chartqa_with_256_image_tokens_by_at_most_10_percent(assets, tmp_path):
    """Issue 13's acceptance: every flag at its default in Gaudi lazy mode (whose default padding is 'bucket')."""
    import tiny_assets
    from transformers import Gemma3Processor

    args = rlv.parse_args(train_argv(assets, tmp_path / "out", "--do_train", "--padding_strategy", "bucket"))
    assert args.data.length_buckets is None  # chosen from the data by settle_length_buckets
    tokenizer = tiny_assets.build_tokenizer()
    processor = Gemma3Processor(image_processor=tiny_assets.build_image_processor(), tokenizer=tokenizer,
                                chat_template=tiny_assets.GEMMA3_CHAT_TEMPLATE, image_seq_length=256)
    rows = datasets.Dataset.from_list(chartqa_like_rows(tokenizer, 256))
    splits = {"train": rlv.IndexedRows(rows, "train", np.arange(len(rows)))}
    schema = rlv.detect_schema(rows.column_names, args.data)
    encoder = rlv.ChatEncoder(processor, rlv.MODEL_FAMILIES["gemma3"], schema, args.data)
    splits = rlv.validate_rows(encoder, splits, rlv.SkippedRows(None), args.training, str(tmp_path / "cache"))
    rlv.settle_length_buckets(encoder, splits, args.training)
    assert len(args.data.length_buckets) <= 4 and args.data.length_buckets[-1] < 512
    collator = rlv.VisionChatCollator(encoder, args.data, rlv.SkippedRows(None))
    batch_size = args.training.per_device_train_batch_size
    order = np.random.default_rng(0).permutation(len(rows))
    shapes, positions, real = set(), 0, 0
    for start in range(0, len(rows), batch_size):
        batch = collator([splits["train"][int(i)] for i in order[start:start + batch_size]])
        shapes.add(tuple(batch["input_ids"].shape))
        positions += batch["attention_mask"].numel()
        real += int(batch["attention_mask"].sum())
    assert 1 - real / positions <= 0.10 and len(shapes) <= 4, (args.data.length_buckets, 1 - real / positions, shapes)
    assert real == int(splits["train"].token_lengths.sum())  # the measured lengths are the real ones


# --- through the command line -------------------------------------------------------------------------------


def test_llava_next_question_with_image_marker_stops_or_is_skipped_never_ends_early(models, assets, tmp_path, capsys):
    train = [{"image": encoded(40, 30), "question": f"How many bars in chart {i}?", "answer": str(i % 7)} for i in range(6)]
    train[2]["question"] = "What does <image> show?"
    data = tmp_path / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train)}).save_to_disk(str(data))
    llava = {**assets, "model": models["llava_next"][0]}
    flags = ("--do_train", "--max_steps", "8", "--per_device_train_batch_size", "2")
    assert rlv.cli(train_argv(llava, tmp_path / "stop", *flags, dataset=str(data))) == 2
    error = capsys.readouterr().err
    assert "1 of 6 rows are invalid: image_placeholder_in_text x1 (train row 2;" in error
    assert not (tmp_path / "stop" / "adapter_model.safetensors").exists()

    trainer = rlv.main(rlv.parse_args(train_argv(llava, tmp_path / "skip", *flags, "--invalid_rows", "skip", dataset=str(data))))
    assert trainer.state.global_step == 8 and len(trainer.train_dataset) == 5
    report = json.loads((tmp_path / "skip" / "skipped_rows.json").read_text())
    assert report["skipped_by_reason"] == {"image_placeholder_in_text": 1} and report["rows"][0]["row_index"] == 2


def test_a_short_run_over_bad_rows_reports_them_all_or_trains_on_the_rest(assets, tmp_path, capsys):
    path, bad = jsonl_with_bad_rows(tmp_path / "data")
    # One epoch of the 13 good rows in batches of 4 is 4 steps, so every row reaches the collator.
    flags = ("--do_train", "--max_steps", "4", "--per_device_train_batch_size", "4")
    assert rlv.cli(train_argv(assets, tmp_path / "stop", *flags, dataset=path)) == 2
    error = capsys.readouterr().err
    assert "error: 3 of 16 rows are invalid: " in error
    assert all(f"{reason} x1 (train row {index};" in error for index, reason in bad.items())

    trainer = rlv.main(rlv.parse_args(train_argv(assets, tmp_path / "skip", *flags, "--invalid_rows", "skip", dataset=path)))
    assert trainer.state.global_step == 4 and len(trainer.train_dataset) == 13
    report = json.loads((tmp_path / "skip" / "skipped_rows.json").read_text())
    skipped = {row["row_index"]: row["reason"] for row in report["rows"] if row["action"] == "skipped"}
    # The three found up front; row 9 (pixel data cut short, its header intact) once its batch decoded it.
    assert skipped == {**bad, 9: "image_unreadable"}


@needs_mpirun
def test_fully_skipped_batches_on_two_ranks_without_a_bos(models, assets, tmp_path):
    """Qwen2.5-VL has no <bos>: a rank whose batch was all skipped trains a <pad> stand-in row, in step with the
    other rank. With --validate_rows none, as only then do bad rows reach the collator."""
    import os
    import subprocess

    from conftest import TESTS_DIR, launch_command

    train = datasets.load_from_disk(assets["dataset"])["train"].select(range(8))
    # Rows 1, 3, 5, 7 have no answer; with batches of one row, each of them is a batch with nothing left in it.
    train = train.map(lambda row, i: {"label": [""] if i % 2 else row["label"]}, with_indices=True)
    datasets.DatasetDict({"train": train}).save_to_disk(str(tmp_path / "half_bad"))
    qwen = {**assets, "model": models["qwen2_5_vl"][0]}
    command = launch_command(
        2, TESTS_DIR / "record_rows_main.py", "--record_dir", str(tmp_path / "record"),
        *train_argv(qwen, tmp_path / "out", "--do_train", "--per_device_train_batch_size", "1", "--invalid_rows", "skip",
                    "--validate_rows", "none", dataset=str(tmp_path / "half_bad")),
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "record" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["lora"] == ranks[1]["lora"] and len(ranks[0]["losses"]) == 4
    report = json.loads((tmp_path / "out" / "skipped_rows.json").read_text())
    assert report["skipped_by_reason"] == {"empty_answer": 4}
