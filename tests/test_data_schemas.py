# Licensed under the Apache License, Version 2.0 (the "License").
"""Every supported dataset layout trains on exactly its assistant texts, wherever the data is stored.

Each test builds a tiny dataset (4-8 rows), runs the CLI in-process for one CPU training step and then
decodes the trained tokens (labels != -100) of a batch made from the training rows in order.
"""

import gc
import json
import re
from types import SimpleNamespace

import datasets
import pytest
from PIL import Image

import run_lora_vlm
from conftest import train_argv

IGNORE_INDEX = -100
EOT = "<end_of_turn>"
BOI = "<start_of_image>"
RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 160, 0), (0, 0, 255), (128, 128, 128)


@pytest.fixture(scope="module", autouse=True)
def frozen_garbage_collector():
    """Keep the objects alive at the start out of garbage collection while these tests run.

    Every training run ends in a full gc.collect() (accelerate's free_memory), which otherwise walks all
    of torch and transformers each time and costs more than the training step itself.
    """
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def image(colour=GREY) -> Image.Image:
    return Image.new("RGB", (40, 32), colour)


# --- the schemas: rows (images as PIL objects) and the assistant texts each row must train ---------


def chartqa():
    rows = [
        {"image": image(), "query": "How many bars are there?", "label": ["4"], "human_or_machine": 0},
        {"image": image(), "query": "Which bar is the tallest?", "label": ["B", "C", "C"], "human_or_machine": 1},
        {"image": image(), "query": "What colour is bar A?", "label": ["red", "blue"], "human_or_machine": 0},
        {"image": image(), "query": "Is A taller than B?", "label": ["  Yes "], "human_or_machine": 1},
    ]
    return rows, [["4"], ["C"], ["red"], ["Yes"]]


def vqa_answer_strings():
    rows = [
        {"image": image(), "question": "How many cats?", "answers": ["2", "3", "3", "2", "3"]},
        {"image": image(), "question": "What animal is it?", "answers": ["cat", "dog"]},
        {"image": image(), "question": "What colour is the sky?", "answers": ["", "blue", " blue"]},
        {"image": image(), "question": "Is it raining?", "answers": ["no"]},
    ]
    return rows, [["3"], ["cat"], ["blue"], ["no"]]


def vqa_answer_dicts():
    def answers(*texts):
        return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]

    rows = [
        {"image": image(), "question": "How many cats?", "answers": answers("2", "3", "3")},
        {"image": image(), "question": "What animal is it?", "answers": answers("cat", "dog", "dog")},
        {"image": image(), "question": "What is on the table?", "answers": answers("a red cup")},
        {"image": image(), "question": "Is it raining?", "answers": answers("no", "yes")},
    ]
    return rows, [["3"], ["dog"], ["a red cup"], ["no"]]


def vqa_single_answer():
    rows = [
        {"image": image(), "question": "How many cats?", "answer": "two"},
        {"image": image(), "question": "What animal is it?", "answer": "a cat"},
        {"image": image(), "question": "What is the price?", "answer": "$1,200.50"},
        {"image": image(), "question": "Which city?", "answer": "Zürich"},
    ]
    return rows, [["two"], ["a cat"], ["$1,200.50"], ["Zürich"]]


def docvqa():
    questions = [
        ("What is the date?", ["May 3, 1999", "3 May 1999"]),
        ("Who signed it?", ["J. Smith"]),
        ("What is the total?", ["$40", "40", "40"]),
        ("What is the title?", ["Annual report"]),
    ]
    rows = [
        {"questionId": i, "question": q, "answers": answers, "image": image(), "docId": 7 + i // 2}
        for i, (q, answers) in enumerate(questions)
    ]
    return rows, [["May 3, 1999"], ["J. Smith"], ["40"], ["Annual report"]]


def part(text=None) -> dict:
    """A content part of a chat message: text, or an image when no text is given."""
    return {"type": "image"} if text is None else {"type": "text", "text": text}


def llava_turns(*values):
    """LLaVA conversations: human and gpt turns alternating."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def chat_turns(*values):
    """Role/content messages with string content: user and assistant alternating."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": v} for i, v in enumerate(values)]


def llava():
    turns = llava_turns
    rows = [
        {"id": "a", "image": image(RED), "conversations": turns("<image>\nWhat is shown?", "A red square.")},
        {"id": "b", "image": image(BLUE),
         "conversations": turns("What colour is this?\n<image>", "Blue.", "Are you sure?", "Yes, it is blue.")},
        {"id": "c", "image": image(GREEN), "conversations": turns("Describe <image> briefly.", "Green.")},
        {"id": "d", "image": image(),
         "conversations": turns("<image>Shape?", "Rectangle.", "Size?", "Small.", "Colour?", "Grey.")},
    ]
    return rows, [["A red square."], ["Blue.", "Yes, it is blue."], ["Green."], ["Rectangle.", "Small.", "Grey."]]


def llava_multi_image():
    turns = llava_turns
    rows = [
        {"images": [image(RED), image(BLUE)],
         "conversations": turns("<image> and <image>: which is red?", "The first.")},
        {"images": [image(GREEN)], "conversations": turns("<image>\nColour?", "Green.", "Brighter?", "No.")},
        {"images": [image(), image(RED), image(BLUE)],
         "conversations": turns("<image><image><image>How many?", "Three.")},
        {"images": [image(BLUE), image(BLUE)], "conversations": turns("Same? <image> <image>", "Yes.")},
    ]
    return rows, [["The first."], ["Green.", "No."], ["Three."], ["Yes."]]


def chat_parts():
    def user(*parts):
        return {"role": "user", "content": list(parts)}

    def assistant(text):
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    def text(t):
        return {"type": "text", "text": t}

    system = {"role": "system", "content": [text("You are terse.")]}
    pic = {"type": "image"}
    rows = [
        {"images": [image(RED)], "messages": [system, user(pic, text("Colour?")), assistant("Red.")]},
        {"images": [image(RED), image(BLUE)],
         "messages": [user(text("First"), pic, text("then"), pic, text("Which is blue?")), assistant("The second.")]},
        {"images": [image()],
         "messages": [user(pic, text("Shape?")), assistant("Square."), user(text("Sure?")), assistant("Quite.")]},
        {"images": [image(GREEN)], "messages": [system, user(text("Look:"), pic), assistant("A green patch.")]},
    ]
    return rows, [["Red."], ["The second."], ["Square.", "Quite."], ["A green patch."]]


def chat_strings():
    turns = chat_turns
    rows = [
        {"images": [image(RED)],
         "messages": [{"role": "system", "content": "Be brief."}, *turns("<image>What colour?", "Red.")]},
        {"images": [image(BLUE)], "messages": turns("What colour is <image>?", "Blue.", "And now?", "Still blue.")},
        {"images": [image(), image()], "messages": turns("<image><image>Same?", "Yes.")},
        {"images": [image(GREEN)], "messages": turns("<image>", "A green image.")},
    ]
    return rows, [["Red."], ["Blue.", "Still blue."], ["Yes."], ["A green image."]]


def captions(column):
    def make():
        rows = [
            {"image": image(RED), column: "A red square."},
            {"image": image(BLUE), column: "  A blue square. "},
            {"image": image(GREEN), column: "A green square on nothing."},
            {"image": image(), column: "Grey."},
        ]
        return rows, [["A red square."], ["A blue square."], ["A green square on nothing."], ["Grey."]]

    return make


SCHEMAS = {
    "chartqa": (chartqa, ()),
    "vqa-answers-strings": (vqa_answer_strings, ()),
    "vqa-answers-dicts": (vqa_answer_dicts, ()),
    "vqa-answer": (vqa_single_answer, ()),
    "docvqa": (docvqa, ()),
    "llava": (llava, ()),
    "llava-images": (llava_multi_image, ()),
    "chat-parts": (chat_parts, ()),
    "chat-strings": (chat_strings, ()),
    "caption": (captions("caption"), ()),
    "caption-text": (captions("text"), ("--caption_instruction", "Write one caption.")),
}


# --- storage: the same rows in memory, as a saved DatasetDict, or as JSONL with relative paths ----


def store(rows: list[dict], storage: str, folder) -> str:
    """Write `rows` and return the --dataset_name that loads them."""
    folder.mkdir(parents=True, exist_ok=True)
    if storage == "memory":  # a Dataset built from PIL objects, saved as it is
        path = folder / "dataset"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif storage == "save_to_disk":  # a DatasetDict with a train split
        path = folder / "dataset_dict"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    else:  # JSONL next to its images, which are named relative to the file
        (folder / "imgs").mkdir(exist_ok=True)
        lines = []
        for index, row in enumerate(rows):
            row = dict(row)
            for column in ("image", "images", "picture", "photo"):
                if column in row:
                    row[column] = save_images(row[column], folder, f"imgs/{column}{index}")
            lines.append(json.dumps(row) + "\n")
        path = folder / "data.jsonl"
        path.write_text("".join(lines))
    return str(path)


def save_images(value, folder, stem):
    if isinstance(value, list):
        return [save_images(item, folder, f"{stem}_{k}") for k, item in enumerate(value)]
    value.save(folder / f"{stem}.png")
    return f"{stem}.png"


STORAGES = ["memory", "save_to_disk", "jsonl"]


# --- reading batches back ------------------------------------------------------------------------


def ordered_batch(trainer) -> dict:
    """The collator's batch for every training row, in dataset order (the dataloader shuffles)."""
    rows = trainer.train_dataset
    return trainer.data_collator([rows[i] for i in range(len(rows))])


def trained_runs(tokenizer, input_ids, labels) -> list[str]:
    """Decoded runs of consecutive trained tokens: one per assistant turn."""
    positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    runs, current = [], []
    for position in positions:
        if current and position != current[-1] + 1:
            runs.append(current)
            current = []
        current.append(position)
    if current:
        runs.append(current)
    return [tokenizer.decode(input_ids[run]) for run in runs]


def batch_trained_texts(trainer, batch) -> list[list[str]]:
    tokenizer = trainer.processing_class.tokenizer
    return [trained_runs(tokenizer, ids, labels) for ids, labels in zip(batch["input_ids"], batch["labels"])]


def decoded_inputs(trainer, batch) -> list[str]:
    tokenizer = trainer.processing_class.tokenizer
    return [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def train(assets, tmp_path, dataset, *extra):
    argv = train_argv(assets, tmp_path / "out", "--max_steps", "1", "--do_train", *extra, dataset=dataset)
    return run_lora_vlm.main(argv)


def with_turn_ends(expected: list[list[str]]) -> list[list[str]]:
    return [[text + EOT for text in row] for row in expected]


# --- each schema, each storage -------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_schema_trains_on_assistant_texts(schema, storage, assets, tmp_path):
    make_rows, extra = SCHEMAS[schema]
    rows, expected = make_rows()
    trainer = train(assets, tmp_path, store(rows, storage, tmp_path / "data"), *extra)
    assert trainer.state.global_step == 1

    batch = ordered_batch(trainer)
    assert batch_trained_texts(trainer, batch) == with_turn_ends(expected)
    # Each row's images, and nothing else, reach the model.
    images_per_row = [len(r.get("images", [r.get("image")])) for r in rows]
    assert batch["pixel_values"].shape[0] == sum(images_per_row)
    for text, count in zip(decoded_inputs(trainer, batch), images_per_row):
        assert text.count(BOI) == count
    # The batches the trainer itself draws train the same texts (in shuffled order).
    shuffled = [text for b in trainer.get_train_dataloader() for text in batch_trained_texts(trainer, b)]
    assert sorted(shuffled) == sorted(with_turn_ends(expected))

    prompts = decoded_inputs(trainer, batch)
    if schema.startswith("caption"):
        instruction = extra[1] if extra else "Describe this image."
        assert all(f"{instruction}{EOT}" in prompt for prompt in prompts)
    if schema in ("chartqa", "vqa-answer", "docvqa"):
        question_column = "query" if schema == "chartqa" else "question"
        assert all(f"<end_of_image>\n\n{row[question_column]}{EOT}" in p for row, p in zip(rows, prompts))
    if schema.startswith("chat"):  # a row's system message is kept: Gemma folds it into the first user turn
        system = "You are terse." if schema == "chat-parts" else "Be brief."
        assert prompts[0].startswith(f"<bos><start_of_turn>user\n{system}\n\n")
        assert system not in prompts[1]


# --- explicit column flags and prompt shaping ----------------------------------------------------


def decoy_rows():
    """Detection would pick image/question/answer/messages; the real data is in the other columns."""
    rows = []
    for index, (colour, answer) in enumerate([(RED, "Red."), (BLUE, "Blue."), (GREEN, "Green."), (RED, "Red again.")]):
        rows.append(
            {
                "image": image(GREY),
                "photo": image(colour),
                "question": "DECOY QUESTION",
                "prompt": f"Real question {index}?",
                "answer": "DECOY",
                "response": answer,
            }
        )
    return rows


def test_explicit_qa_columns_override_detection(assets, tmp_path):
    rows = decoy_rows()
    flags = ("--image_column", "photo", "--question_column", "prompt", "--answer_column", "response")
    trainer = train(assets, tmp_path, store(rows, "memory", tmp_path / "data"), *flags)
    batch = ordered_batch(trainer)
    assert batch_trained_texts(trainer, batch) == with_turn_ends([[r["response"]] for r in rows])
    for row, prompt in zip(rows, decoded_inputs(trainer, batch)):
        assert row["prompt"] in prompt and "DECOY" not in prompt
    # The photo's colour, not the grey decoy image, is what the model sees (mean = std = 0.5: red is +1, -1, -1).
    red_channel = batch["pixel_values"][:, 0].mean(dim=(1, 2))
    assert red_channel.tolist() == pytest.approx([1, -1, -1, 1], abs=0.05)


def test_explicit_messages_column_overrides_detection(assets, tmp_path):
    def chat(question, answer):
        return [{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer}]

    rows = [
        {"image": image(), "messages": chat("DECOY", "DECOY"), "dialog": chat(f"Real {i}?", f"Answer {i}."),
         "question": "DECOY", "answer": "DECOY"}
        for i in range(4)
    ]
    trainer = train(assets, tmp_path, store(rows, "jsonl", tmp_path / "data"), "--messages_column", "dialog")
    batch = ordered_batch(trainer)
    assert batch_trained_texts(trainer, batch) == with_turn_ends([[f"Answer {i}."] for i in range(4)])
    assert all("DECOY" not in prompt for prompt in decoded_inputs(trainer, batch))


def test_system_prompt_and_question_template_shape_the_prompt(assets, tmp_path):
    rows, expected = chartqa()
    flags = ("--system_prompt", "Answer briefly.", "--question_template", "Q: {question}\nA (one word):")
    trainer = train(assets, tmp_path, store(rows, "memory", tmp_path / "data"), *flags)
    batch = ordered_batch(trainer)
    assert batch_trained_texts(trainer, batch) == with_turn_ends(expected)
    for row, prompt in zip(rows, decoded_inputs(trainer, batch)):
        assert prompt.startswith("<bos><start_of_turn>user\nAnswer briefly.\n\n")
        assert f"Q: {row['query']}\nA (one word):{EOT}\n<start_of_turn>model\n" in prompt
        assert prompt.index("Answer briefly.") < prompt.index(BOI) < prompt.index("Q: ")


def test_system_prompt_does_not_replace_a_rows_own(assets, tmp_path):
    rows, expected = chat_parts()
    trainer = train(assets, tmp_path, store(rows, "memory", tmp_path / "data"), "--system_prompt", "Default system.")
    batch = ordered_batch(trainer)
    assert batch_trained_texts(trainer, batch) == with_turn_ends(expected)
    prompts = decoded_inputs(trainer, batch)
    assert prompts[0].startswith("<bos><start_of_turn>user\nYou are terse.\n\n") and "Default system." not in prompts[0]
    assert prompts[1].startswith("<bos><start_of_turn>user\nDefault system.\n\n")


# --- several images per row ----------------------------------------------------------------------


MULTI_IMAGE_ROWS = {
    "chat": {
        "images": [image(RED), image(BLUE)],
        "messages": [
            {"role": "user", "content": [part("First"), part(), part("then"), part(), part("which is red?")]},
            {"role": "assistant", "content": [part("The first.")]},
        ],
    },
    "llava": {
        "images": [image(RED), image(BLUE)],
        "conversations": llava_turns("First <image> then <image> which is red?", "The first."),
    },
}


@pytest.mark.parametrize("schema", list(MULTI_IMAGE_ROWS))
def test_each_image_lands_at_its_placeholder(schema, assets, tmp_path):
    rows = [MULTI_IMAGE_ROWS[schema]] * 4
    trainer = train(assets, tmp_path, store(rows, "jsonl", tmp_path / "data"))
    batch = ordered_batch(trainer)
    prompt = decoded_inputs(trainer, batch)[0]
    first = prompt.index(BOI)
    second = prompt.index(BOI, first + 1)
    assert prompt.index("First") < first < prompt.index("then") < second < prompt.index("which is red?")
    # The first placeholder gets the first (red) image, the second the blue one.
    means = batch["pixel_values"][:2].mean(dim=(2, 3)).flatten()
    assert means.tolist() == pytest.approx([1, -1, -1, -1, -1, 1], abs=0.05)
    assert batch_trained_texts(trainer, batch) == [["The first." + EOT]] * 4


MISMATCHED_ROWS = {
    "llava, two placeholders, one image": {
        "images": [image()], "conversations": llava_turns("<image> vs <image>?", "Same."),
    },
    "chat, one image part, two images": {
        "images": [image(), image()],
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "Grey."}]}],
    },
}


@pytest.mark.parametrize("case", list(MISMATCHED_ROWS))
def test_image_count_mismatch_names_the_row(case, assets, tmp_path):
    good = dict(MISMATCHED_ROWS["chat, one image part, two images"], images=[image()]) if "chat" in case else dict(
        MISMATCHED_ROWS["llava, two placeholders, one image"], images=[image(), image()]
    )
    rows = [good, good, MISMATCHED_ROWS[case], good]
    with pytest.raises(ValueError, match=r"train row 2: image_count_mismatch: \d image placeholders but \d images"):
        train(assets, tmp_path, store(rows, "memory", tmp_path / "data"))


# --- bad rows ------------------------------------------------------------------------------------

BAD_ROWS = {1: "image_unreadable", 3: "image_missing", 4: "empty_answer", 6: "too_long"}
# The training arguments prepare_splits reads, for calling it without the CLI.
TRAIN_ONLY = SimpleNamespace(do_train=True, do_eval=False, do_predict=False, seed=0)


def bad_rows_dataset(folder) -> str:
    """JSONL, 8 rows: a corrupt image (1), a missing file (3), an empty answer (4), an over-long question (6)."""
    folder.mkdir(parents=True)
    image(RED).save(folder / "ok.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    rows = [{"image": "ok.png", "question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(8)]
    rows[1]["image"] = "corrupt.png"
    rows[3]["image"] = "missing/nowhere.png"
    rows[4]["answer"] = "   "
    rows[6]["question"] = " ".join(["What is the value of bar B in this chart"] * 20) + "?"
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_bad_rows_are_skipped_and_reported(assets, tmp_path):
    dataset = bad_rows_dataset(tmp_path / "data")
    trainer = train(assets, tmp_path, dataset, "--invalid_rows", "skip", "--max_seq_length", "64")
    assert trainer.state.global_step == 1
    report = json.loads((tmp_path / "out" / "skipped_rows.json").read_text())
    assert report["skipped_by_reason"] == {reason: 1 for reason in BAD_ROWS.values()}
    assert report["truncated_by_reason"] == {}  # the normal rows fit in --max_seq_length
    assert {(r["split"], r["row_index"], r["reason"]) for r in report["rows"]} == {
        ("train", index, reason) for index, reason in BAD_ROWS.items()
    }
    batch = ordered_batch(trainer)
    assert batch_trained_texts(trainer, batch) == [[f"Answer {i}.{EOT}"] for i in (0, 2, 5, 7)]


def test_bad_rows_stop_the_run_by_default(assets, tmp_path):
    dataset = bad_rows_dataset(tmp_path / "data")
    with pytest.raises(ValueError) as raised:
        train(assets, tmp_path, dataset, "--max_seq_length", "64")
    # The trainer shuffles, so the first bad row met may be any of them; it must be named with its own reason.
    found = re.search(r"Invalid train row (\d+): (\w+): ", str(raised.value))
    assert found, str(raised.value)
    assert BAD_ROWS[int(found.group(1))] == found.group(2)
    assert "--invalid_rows skip" in str(raised.value)


def test_first_bad_row_in_order_is_named(processor, tmp_path):
    """Without the trainer's shuffling the collator stops at the first bad row: row 1."""
    data_args = run_lora_vlm.DataArguments(dataset_name=bad_rows_dataset(tmp_path / "data"), max_seq_length=64)
    raw, base_dir = run_lora_vlm.load_raw_datasets(data_args, None)
    rows = run_lora_vlm.prepare_splits(raw, data_args, TRAIN_ONLY)["train"]
    schema = run_lora_vlm.detect_schema(rows.dataset.column_names, data_args)
    family = run_lora_vlm.model_family("gemma3")
    collator = run_lora_vlm.VisionChatCollator(processor, family, schema, data_args, base_dir)
    with pytest.raises(ValueError, match=r"^Invalid train row 1: image_unreadable: "):
        collator([rows[i] for i in range(len(rows))])
    for index, reason in BAD_ROWS.items():
        with pytest.raises(ValueError, match=rf"^Invalid train row {index}: {reason}: "):
            collator([rows[0], rows[index]])


# --- schema-level problems fail at start-up ------------------------------------------------------

SCHEMA_PROBLEMS = {
    "no image column": (
        [{"picture": "a.png", "question": "Q?", "answer": "A."}], (),
        ["'picture'", "'question'", "'answer'", "--image_column"],
    ),
    "unknown schema": (
        [{"image": "a.png", "prompt": "Q?", "reply": "A."}], (),
        ["'image'", "'prompt'", "'reply'", "--question_column", "--answer_column", "--messages_column"],
    ),
    "question but no answer": (
        [{"image": "a.png", "question": "Q?", "notes": "x"}], (),
        ["'question'", "'notes'", "--answer_column"],
    ),
    "--image_column names a missing column": (
        [{"image": "a.png", "question": "Q?", "answer": "A."}], ("--image_column", "photo"),
        ["--image_column photo", "no such column", "'image'", "'question'", "'answer'"],
    ),
    "--answer_column names a missing column": (
        [{"image": "a.png", "question": "Q?", "answer": "A."}], ("--answer_column", "reply"),
        ["--answer_column reply", "no such column", "'answer'"],
    ),
}


@pytest.mark.parametrize("case", list(SCHEMA_PROBLEMS))
def test_schema_problems_fail_before_the_model_loads(case, assets, tmp_path):
    rows, flags, expected = SCHEMA_PROBLEMS[case]
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows * 4))
    # A model path that does not exist: reaching model loading would raise OSError instead.
    argv = train_argv(assets, tmp_path / "out", "--do_train", *flags, dataset=str(data_file))
    argv[argv.index("--model_name_or_path") + 1] = str(tmp_path / "no-model-here")
    with pytest.raises(ValueError) as raised:
        run_lora_vlm.main(argv)
    for text in expected:
        assert text in str(raised.value)


# --- loading details -----------------------------------------------------------------------------


def test_split_files_in_a_folder(tmp_path):
    """Files named after a split, shard suffixes included, become that split; others are train."""
    rows = {"train-00000-of-00002.jsonl": 3, "train-00001-of-00002.jsonl": 2, "extra.jsonl": 1,
            "validation-00000-of-00001.jsonl": 2, "test.jsonl": 4}
    for name, count in rows.items():
        (tmp_path / name).write_text(f'{{"image": "a.png", "question": "Q?", "answer": "{name}"}}\n' * count)
    raw, base_dir = run_lora_vlm.load_raw_datasets(run_lora_vlm.DataArguments(dataset_name=str(tmp_path)), None)
    assert base_dir == tmp_path
    assert {name: len(split) for name, split in raw.items()} == {"train": 6, "validation": 2, "test": 4}


def test_image_folder_with_metadata(tmp_path):
    for index, colour in enumerate([RED, BLUE]):
        image(colour).save(tmp_path / f"{index}.png")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "0.png", "caption": "Red."}\n{"file_name": "1.png", "caption": "Blue."}\n'
    )
    raw, _ = run_lora_vlm.load_raw_datasets(run_lora_vlm.DataArguments(dataset_name=str(tmp_path)), None)
    assert set(raw["train"].column_names) == {"image", "caption"}


def test_vqa_answers_as_a_dict_of_lists():
    """VQAv2 on the Hub declares answers as Sequence({answer, ...}), which datasets reads as a dict of lists."""
    value = {"answer": ["2", "3", "3"], "answer_confidence": ["yes", "yes", "maybe"], "answer_id": [1, 2, 3]}
    assert run_lora_vlm.choose_answer(value) == ("3", ["2", "3", "3"])


def test_image_lists_of_any_list_type_are_not_decoded():
    for feature in (datasets.Image(), datasets.List(datasets.Image()), datasets.LargeList(datasets.Image()),
                    datasets.List(datasets.Image(), length=2)):
        result = run_lora_vlm.undecoded(feature)
        inner = result if isinstance(result, datasets.Image) else result.feature
        assert inner.decode is False
        assert getattr(result, "length", None) == getattr(feature, "length", None)


# --- single rows ---------------------------------------------------------------------------------


def normalize(row, columns, **flags):
    data_args = run_lora_vlm.DataArguments(dataset_name="rows", **flags)
    return run_lora_vlm.normalize_row(row, run_lora_vlm.detect_schema(columns, data_args), data_args)


BAD_SINGLE_ROWS = {
    # Without it the question is unanswerable, and one image-less row in a batch breaks the processor call.
    "question without its image": ({"image": None, "question": "Q?", "answer": "A."}, "image_missing"),
    "caption without its image": ({"image": None, "caption": "A cat."}, "image_missing"),
    "answer dicts without 'answer'": (
        {"image": "a.png", "question": "Q?", "answers": [{"text": "A."}]}, "non_string_answer"
    ),
    "numeric answer": ({"image": "a.png", "question": "Q?", "answer": 3}, "non_string_answer"),
    "empty answer list": ({"image": "a.png", "question": "Q?", "answers": []}, "empty_answer"),
    "blank question": ({"image": "a.png", "question": "  ", "answer": "A."}, "empty_question"),
    "content parts that are not dicts": (
        {"images": [], "messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": ["Hello."]}]},
        "bad_conversation",
    ),
    "unknown role": ({"image": None, "conversations": [{"from": "robot", "value": "Hi"}]}, "bad_conversation"),
    "no assistant turn": ({"image": "a.png", "conversations": llava_turns("<image>Hi")}, "no_assistant_turn"),
    "empty assistant turn": (
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": " "}]},
        "empty_answer",
    ),
    "placeholder without an image": (
        {"image": None, "conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Hello."}]},
        "image_count_mismatch",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SINGLE_ROWS))
def test_bad_single_rows(case):
    row, reason = BAD_SINGLE_ROWS[case]
    with pytest.raises(run_lora_vlm.InvalidRowError) as raised:
        normalize(row, list(row))
    assert raised.value.reason == reason


def test_arrow_filled_parts_keep_their_text():
    """Arrow gives every part of a list column every key: image parts get "text": None, and so may text."""
    row = {
        "images": ["a.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": None},
                                         {"type": "text", "text": " Hi "}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        ],
    }
    example = normalize(row, list(row))
    assert example["messages"][0]["content"] == [
        {"type": "image"}, {"type": "text", "text": ""}, {"type": "text", "text": "Hi"}
    ]
    assert example["answers"] == ["Hello."]


def test_an_empty_turn_next_to_a_good_one_is_an_empty_answer():
    row = {"image": "a.png", "conversations": llava_turns("<image>Hi", "Hello.", "And?", "")}
    with pytest.raises(run_lora_vlm.InvalidRowError) as raised:
        normalize(row, list(row))
    assert raised.value.reason == "empty_answer"


def test_switching_off_image_decoding_does_not_copy_the_data(tmp_path):
    """Start-up must not grow with the dataset: no cache copy of the rows is written beside the data."""
    path = tmp_path / "dataset"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chartqa()[0])}).save_to_disk(str(path))
    data_args = run_lora_vlm.DataArguments(dataset_name=str(path))
    raw, _ = run_lora_vlm.load_raw_datasets(data_args, None)
    splits = run_lora_vlm.prepare_splits(raw, data_args, TRAIN_ONLY)
    assert splits["train"].dataset.features["image"].decode is False
    assert isinstance(splits["train"][0]["row"]["image"], dict)
    assert not list(path.rglob("cache-*.arrow"))
