# Licensed under the Apache License, Version 2.0 (the "License").
"""Every supported dataset layout trains on exactly its assistant texts, wherever the data is stored.

Schemas and storage are checked apart. Each schema's rows go, in memory, through the script's data path (the
splits, schema detection, normalization and the collator) and the batch's trained tokens (labels != -100) are
decoded. Each storage format is loaded once, from disk, the same way. A few runs of the whole command check what
only the trainer shows: the batches it draws, the skipped-row report, and errors raised through it.
"""

import json
import math

import datasets
import pytest
from PIL import Image

import run_lora_vlm
from conftest import (
    batch_trained_texts, collate_split, decoded_inputs, make_collator, run_training, script_args, train_argv,
)

EOT = "<end_of_turn>"
BOI = "<start_of_image>"
RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 160, 0), (0, 0, 255), (128, 128, 128)


# --- the schemas: rows (images as PIL objects) and the assistant texts each row must train ---------


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


def in_memory(rows: list[dict]) -> datasets.DatasetDict:
    """The rows as a datasets table (Arrow, as any loaded dataset), with a train split."""
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})


def with_turn_ends(expected: list[list[str]]) -> list[list[str]]:
    return [[text + EOT for text in row] for row in expected]


def collate_rows(processor, rows, *flags):
    """(tokenizer, batch of all `rows` in order) through the script's data path, under these flags."""
    collator, batch = collate_split(processor, script_args("--do_train", *flags), in_memory(rows))
    return processor.tokenizer, batch


# --- each schema, in memory ----------------------------------------------------------------------


@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_schema_trains_on_assistant_texts(schema, processor):
    make_rows, extra = SCHEMAS[schema]
    rows, expected = make_rows()
    tokenizer, batch = collate_rows(processor, rows, *extra)
    assert batch_trained_texts(tokenizer, batch) == with_turn_ends(expected)
    # Each row's images, and nothing else, reach the model.
    images_per_row = [len(r.get("images", [r.get("image")])) for r in rows]
    assert batch["pixel_values"].shape[0] == sum(images_per_row)
    prompts = decoded_inputs(tokenizer, batch)
    assert [prompt.count(BOI) for prompt in prompts] == images_per_row

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


# --- each storage format, loaded once --------------------------------------------------------------

# One row per colour: the answer names the colour, so a row trained with another row's image would show.
COLOURS = {"red": RED, "green": GREEN, "blue": BLUE, "grey": GREY}


def qa_rows(folder=None):
    """Question/answer rows; with `folder`, each image is saved there and named by a path relative to it."""
    rows = []
    for index, (name, colour) in enumerate(COLOURS.items()):
        picture = image(colour)
        if folder is not None:
            (folder / "imgs").mkdir(parents=True, exist_ok=True)
            picture.save(folder / "imgs" / f"{name}.png")
            picture = f"imgs/{name}.png"
        rows.append({"image": picture, "question": f"What colour is picture {index}?", "answer": name.capitalize()})
    return rows


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def store_dataset(folder):
    path = folder / "dataset"
    datasets.Dataset.from_list(qa_rows()).save_to_disk(str(path))
    return path


def store_dataset_dict(folder):
    path = folder / "dataset_dict"
    in_memory(qa_rows()).save_to_disk(str(path))
    return path


def store_json_array(folder):
    (folder / "data.json").write_text(json.dumps(qa_rows(folder)))
    return folder / "data.json"


def store_jsonl(folder):
    write_lines(folder / "data.jsonl", qa_rows(folder))
    return folder / "data.jsonl"


def store_csv(folder):
    datasets.Dataset.from_list(qa_rows(folder)).to_csv(str(folder / "data.csv"), index=False)
    return folder / "data.csv"


def store_parquet(folder):
    """Images embedded as bytes, with the Image feature recorded in the file."""
    datasets.Dataset.from_list(qa_rows()).to_parquet(str(folder / "data.parquet"))
    return folder / "data.parquet"


def store_image_folder(folder):
    """An image folder with captions in metadata.jsonl: the caption schema."""
    rows = qa_rows(folder)
    write_lines(folder / "imgs" / "metadata.jsonl", [
        {"file_name": row["image"].removeprefix("imgs/"), "caption": row["answer"]} for row in rows
    ])
    return folder / "imgs"


STORAGES = {
    "Dataset.save_to_disk": store_dataset,
    "DatasetDict.save_to_disk": store_dataset_dict,
    "json": store_json_array,
    "jsonl": store_jsonl,
    "csv": store_csv,
    "parquet": store_parquet,
    "imagefolder": store_image_folder,
}


def channel_means(pixel_values) -> list[float]:
    """Each image's mean per channel, all in one flat list."""
    return pixel_values.mean(dim=(2, 3)).flatten().tolist()


def expected_channel_means(colours) -> list[float]:
    """The tiny processor rescales to [0, 1] and normalizes with mean = std = 0.5: a value c becomes 2c/255 - 1."""
    return [2 * c / 255 - 1 for colour in colours for c in colour]


@pytest.mark.parametrize("storage", list(STORAGES))
def test_storage_format_loads_with_its_images(storage, processor, tmp_path):
    path = STORAGES[storage](tmp_path)
    tokenizer = processor.tokenizer
    _, batch = collate_split(processor, script_args("--do_train", dataset=str(path)))
    names = [name.capitalize() for name in COLOURS]
    assert batch_trained_texts(tokenizer, batch) == with_turn_ends([[name] for name in names])
    assert channel_means(batch["pixel_values"]) == pytest.approx(expected_channel_means(COLOURS.values()), abs=0.02)
    if storage == "imagefolder":
        assert all(prompt.endswith(f"Describe this image.{EOT}\n<start_of_turn>model\n{name}{EOT}\n")
                   for prompt, name in zip(decoded_inputs(tokenizer, batch), names))


def test_split_files_in_a_folder_become_their_splits(processor, tmp_path):
    """Files named after a split, shard suffixes included, become that split; images are relative to the folder."""
    rows = qa_rows(tmp_path)
    write_lines(tmp_path / "train-00000-of-00002.jsonl", rows[:2])
    write_lines(tmp_path / "train-00001-of-00002.jsonl", rows[2:3])
    write_lines(tmp_path / "validation-00000-of-00001.jsonl", rows[3:])
    write_lines(tmp_path / "test.jsonl", rows[1:])
    args = script_args("--do_train", "--do_eval", "--do_predict", dataset=str(tmp_path))
    splits, _, _ = run_lora_vlm.load_data(args.data, args.training, None)
    assert {name: (rows.split, len(rows)) for name, rows in splits.items()} == {
        "train": ("train", 3), "eval": ("validation", 1), "test": ("test", 3)
    }
    _, batch = collate_split(processor, args, split="eval")
    assert batch_trained_texts(processor.tokenizer, batch) == [["Grey" + EOT]]
    assert channel_means(batch["pixel_values"]) == pytest.approx(expected_channel_means([GREY]), abs=0.02)


def test_a_data_file_named_after_no_split_is_refused_when_others_are(tmp_path):
    for name in ("train.jsonl", "test.jsonl", "extra.jsonl"):
        write_lines(tmp_path / name, [{"image": "a.png", "question": "Q?", "answer": name}])
    args = script_args("--do_train", dataset=str(tmp_path))
    with pytest.raises(ValueError, match=r"\['extra.jsonl'\] belong to no split"):
        run_lora_vlm.load_data(args.data, args.training, None)


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


def test_explicit_qa_columns_override_detection(processor):
    rows = decoy_rows()
    flags = ("--image_column", "photo", "--question_column", "prompt", "--answer_column", "response")
    tokenizer, batch = collate_rows(processor, rows, *flags)
    assert batch_trained_texts(tokenizer, batch) == with_turn_ends([[r["response"]] for r in rows])
    for row, prompt in zip(rows, decoded_inputs(tokenizer, batch)):
        assert row["prompt"] in prompt and "DECOY" not in prompt
    # The photo's colour, not the grey decoy image, is what the model sees.
    assert channel_means(batch["pixel_values"]) == pytest.approx(
        expected_channel_means([RED, BLUE, GREEN, RED]), abs=0.02
    )


def test_explicit_messages_column_overrides_detection(processor):
    def chat(question, answer):
        return [{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer}]

    rows = [
        {"image": image(), "messages": chat("DECOY", "DECOY"), "dialog": chat(f"Real {i}?", f"Answer {i}."),
         "question": "DECOY", "answer": "DECOY"}
        for i in range(4)
    ]
    tokenizer, batch = collate_rows(processor, rows, "--messages_column", "dialog")
    assert batch_trained_texts(tokenizer, batch) == with_turn_ends([[f"Answer {i}."] for i in range(4)])
    assert all("DECOY" not in prompt for prompt in decoded_inputs(tokenizer, batch))


def test_system_prompt_and_question_template_shape_the_prompt(processor):
    rows, expected = chartqa()
    flags = ("--system_prompt", "Answer briefly.", "--question_template", "Q: {question}\nA (one word):")
    tokenizer, batch = collate_rows(processor, rows, *flags)
    assert batch_trained_texts(tokenizer, batch) == with_turn_ends(expected)
    for row, prompt in zip(rows, decoded_inputs(tokenizer, batch)):
        assert prompt.startswith("<bos><start_of_turn>user\nAnswer briefly.\n\n")
        assert f"Q: {row['query']}\nA (one word):{EOT}\n<start_of_turn>model\n" in prompt
        assert prompt.index("Answer briefly.") < prompt.index(BOI) < prompt.index("Q: ")


def test_system_prompt_does_not_replace_a_rows_own(processor):
    rows, expected = chat_parts()
    tokenizer, batch = collate_rows(processor, rows, "--system_prompt", "Default system.")
    assert batch_trained_texts(tokenizer, batch) == with_turn_ends(expected)
    prompts = decoded_inputs(tokenizer, batch)
    assert prompts[0].startswith("<bos><start_of_turn>user\nYou are terse.\n\n") and "Default system." not in prompts[0]
    assert prompts[1].startswith("<bos><start_of_turn>user\nDefault system.\n\n")


# --- several images per row ----------------------------------------------------------------------


MULTI_IMAGE_ROWS = {
    "chat": {
        "images": ["imgs/red.png", "imgs/blue.png"],
        "messages": [
            {"role": "user", "content": [part("First"), part(), part("then"), part(), part("which is red?")]},
            {"role": "assistant", "content": [part("The first.")]},
        ],
    },
    "llava": {
        "images": ["imgs/red.png", "imgs/blue.png"],
        "conversations": llava_turns("First <image> then <image> which is red?", "The first."),
    },
}


@pytest.mark.parametrize("schema", list(MULTI_IMAGE_ROWS))
def test_each_image_lands_at_its_placeholder(schema, processor, tmp_path):
    """JSONL whose rows list several images by paths relative to the file."""
    qa_rows(tmp_path)  # writes imgs/red.png, imgs/blue.png, ...
    write_lines(tmp_path / "data.jsonl", [MULTI_IMAGE_ROWS[schema]] * 4)
    _, batch = collate_split(processor, script_args("--do_train", dataset=str(tmp_path / "data.jsonl")))
    prompt = decoded_inputs(processor.tokenizer, batch)[0]
    first = prompt.index(BOI)
    second = prompt.index(BOI, first + 1)
    assert prompt.index("First") < first < prompt.index("then") < second < prompt.index("which is red?")
    # The first placeholder gets the first (red) image, the second the blue one.
    assert channel_means(batch["pixel_values"][:2]) == pytest.approx(expected_channel_means([RED, BLUE]), abs=0.02)
    assert batch_trained_texts(processor.tokenizer, batch) == [["The first." + EOT]] * 4


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
def test_image_count_mismatch_names_the_row(case, processor):
    good = dict(MISMATCHED_ROWS["chat, one image part, two images"], images=[image()]) if "chat" in case else dict(
        MISMATCHED_ROWS["llava, two placeholders, one image"], images=[image(), image()]
    )
    rows = [good, good, MISMATCHED_ROWS[case], good]
    with pytest.raises(ValueError, match=r"train row 2: image_count_mismatch: \d image placeholders but \d images"):
        collate_rows(processor, rows)


# --- bad rows ------------------------------------------------------------------------------------

BAD_ROWS = {1: "image_unreadable", 3: "image_missing", 4: "empty_answer", 6: "too_long"}


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
    write_lines(path, rows)
    return str(path)


def test_a_run_skips_and_reports_bad_rows_and_trains_the_rest(assets, tmp_path):
    """The whole command: the trainer draws its own (shuffled) batches; every good row is trained once."""
    dataset = bad_rows_dataset(tmp_path / "data")
    trainer = run_training(train_argv(assets, tmp_path / "out", "--do_train", "--max_steps", "1",
                                      "--invalid_rows", "skip", "--max_seq_length", "64", dataset=dataset))
    assert trainer.state.global_step == 1
    report = json.loads((tmp_path / "out" / "skipped_rows.json").read_text())
    assert report["skipped_by_reason"] == {reason: 1 for reason in BAD_ROWS.values()}
    assert report["truncated_by_reason"] == {}  # the normal rows fit in --max_seq_length
    assert {(r["split"], r["row_index"], r["reason"]) for r in report["rows"]} == {
        ("train", index, reason) for index, reason in BAD_ROWS.items()
    }
    tokenizer = trainer.processing_class.tokenizer
    drawn = [text for batch in trainer.get_train_dataloader() for text in batch_trained_texts(tokenizer, batch)]
    assert sorted(drawn) == [[f"Answer {i}.{EOT}"] for i in (0, 2, 5, 7)]


def test_a_run_trains_on_rows_with_several_images_each(assets, tmp_path):
    """The whole command on multi-turn rows of 1 to 3 images: the model takes batches whose rows differ in images."""
    rows, _ = llava_multi_image()
    in_memory(rows).save_to_disk(str(tmp_path / "data"))
    trainer = run_training(train_argv(assets, tmp_path / "out", "--do_train", "--max_steps", "1",
                                      "--per_device_train_batch_size", "4", dataset=str(tmp_path / "data")))
    assert trainer.state.global_step == 1
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 1 and math.isfinite(losses[0])


def test_bad_rows_stop_the_run_by_default(assets, tmp_path):
    dataset = bad_rows_dataset(tmp_path / "data")
    with pytest.raises(ValueError) as raised:
        run_training(train_argv(assets, tmp_path / "out", "--do_train", "--max_seq_length", "64", dataset=dataset))
    # The validation pass reports every bad row at once, each under its own reason, before the model loads.
    message = str(raised.value)
    assert message.startswith(f"{len(BAD_ROWS)} of 8 rows are invalid: "), message
    for index, reason in BAD_ROWS.items():
        assert f"{reason} x1 (train row {index};" in message, message
    assert "--invalid_rows skip" in message


def test_first_bad_row_in_order_is_named(processor, tmp_path):
    """Without the trainer's shuffling the collator stops at the first bad row: row 1."""
    args = script_args("--do_train", "--max_seq_length", "64", dataset=bad_rows_dataset(tmp_path / "data"))
    splits, _, base_dir = run_lora_vlm.load_data(args.data, args.training, None)
    rows = splits["train"]
    collator = make_collator(processor, args.data, rows.dataset.column_names, base_dir)
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
def test_schema_problems_fail_before_the_model_loads(case, assets, tmp_path, monkeypatch):
    rows, flags, expected = SCHEMA_PROBLEMS[case]
    data_file = tmp_path / "data.jsonl"
    write_lines(data_file, rows * 4)
    monkeypatch.setattr(run_lora_vlm, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError) as raised:
        run_training(train_argv(assets, tmp_path / "out", "--do_train", *flags, dataset=str(data_file)))
    for text in expected:
        assert text in str(raised.value)


# --- loading details -----------------------------------------------------------------------------


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


def test_switching_off_image_decoding_does_not_copy_the_data(tmp_path):
    """Start-up must not grow with the dataset: no cache copy of the rows is written beside the data."""
    path = store_dataset_dict(tmp_path)
    args = script_args("--do_train", dataset=str(path))
    splits, _, _ = run_lora_vlm.load_data(args.data, args.training, None)
    assert splits["train"].dataset.features["image"].decode is False
    assert isinstance(splits["train"][0]["row"]["image"], dict)
    assert not list(path.rglob("cache-*.arrow"))


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
