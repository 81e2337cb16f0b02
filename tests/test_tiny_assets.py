# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Checks that the tiny offline assets behave like google/gemma-3-*-it and ChartQA.

Run offline: ``HF_HUB_OFFLINE=1 python -m pytest -q tests/test_tiny_assets.py`` (a few seconds).
"""

import math
import os

import numpy as np
import pytest
import torch

import tiny_assets
from conftest import run_builder_cli
from tiny_assets import chart_messages


@pytest.fixture(scope="module")
def tokenizer():
    """One tokenizer for the module: training it is the slow part of building it."""
    return tiny_assets.build_tokenizer()


@pytest.fixture(scope="module")
def built_processor(tokenizer):
    """The processor wrapping the module's tokenizer (conftest's `processor` is the reloaded one)."""
    return tiny_assets.build_processor(tokenizer)


@pytest.fixture(scope="module")
def built_model(tokenizer):
    """The tiny random model, seeded."""
    return tiny_assets.build_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory):
    """Assets written to disk once, through the command-line entry point (small splits)."""
    out = tmp_path_factory.mktemp("tiny")
    printed = run_builder_cli(tiny_assets.main, "--output_dir", str(out), "--n_train", "8", "--n_val", "4", "--n_test", "4")
    assert printed == [str(out / "gemma3"), str(out / "chartqa"), str(out / "chart.png")]
    return {"model": printed[0], "dataset": printed[1], "image": printed[2]}


# --- tokenizer -----------------------------------------------------------------------------------


def test_special_token_ids(tokenizer):
    """Gemma's fixed ids for pad/eos/bos/unk, and every special id inside the vocabulary."""
    assert type(tokenizer).__name__ == "GemmaTokenizerFast"
    ids_by_role = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]
    assert ids_by_role == [0, 1, 2, 3]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<eos>", "<bos>", "<unk>"]
    names = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    ids = tokenizer.convert_tokens_to_ids(names)
    assert len(set(ids)) == len(names)
    assert all(4 <= i < len(tokenizer) for i in ids)
    # Each one is a single, atomic token in running text.
    for name, i in zip(names, ids):
        assert tokenizer(f"a{name}b", add_special_tokens=False).input_ids.count(i) == 1
    # The attributes Gemma3Processor.__init__ reads.
    assert (tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token) == tuple(names[2:])
    assert (tokenizer.boi_token_id, tokenizer.eoi_token_id, tokenizer.image_token_id) == tuple(ids[2:])


def test_bos_prepended_once_and_no_eos(tokenizer):
    """Like the real tokenizer: one <bos> in front, nothing at the end."""
    ids = tokenizer("hi").input_ids
    assert ids[0] == 2 and ids.count(2) == 1
    assert tokenizer.eos_token_id not in ids
    assert tokenizer("hi", add_special_tokens=False).input_ids == ids[1:]


@pytest.mark.parametrize(
    "text",
    [
        "How many bars are there?",
        "  two  spaces, a tab\tand\nnew\n\nlines  ",
        "Digits 0123456789, 3.14 and -42%!",
        "Non-ASCII: café é °C 21°, naïve — 日本語 🙂",
        "<start_of_turn>user\nHi<end_of_turn>\n",
    ],
)
def test_round_trip(tokenizer, text):
    """decode(encode(text)) gives the text back, byte for byte."""
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + text
    assert tokenizer.decode(ids[1:], skip_special_tokens=False) == text
    assert tokenizer.unk_token_id not in ids


def test_digits_are_single_tokens(tokenizer):
    """Numbers split into digits, as in Gemma, so chart values are learnable piece by piece."""
    tokens = tokenizer.tokenize("1234")
    assert [t for t in tokens if t != tiny_assets.SPIECE_SPACE] == ["1", "2", "3", "4"]


def test_chat_template(tokenizer):
    """Gemma 3's template: bos first, system folded into the first user turn, trim, model role."""
    assert tokenizer.chat_template == tiny_assets.GEMMA3_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  How many bars?  "}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>How many bars?<end_of_turn>\n"
        "<start_of_turn>model\n3<end_of_turn>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    # Plain string content works too, and roles must alternate.
    assert tokenizer.apply_chat_template([{"role": "user", "content": " hi "}], tokenize=False) == (
        "<bos><start_of_turn>user\nhi<end_of_turn>\n"
    )
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


# --- processor -----------------------------------------------------------------------------------


def test_processor_expands_image(built_processor, tokenizer):
    """One <start_of_image> becomes \\n\\n<boi> + 4 soft tokens + <eoi>\\n\\n, with token_type_ids."""
    processor = built_processor
    row = tiny_assets.make_chart_rows(1, seed=0)[0]
    text = processor.apply_chat_template(chart_messages(row), tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\n<start_of_image>" + row["query"])
    batch = processor(text=[text], images=[[row["image"]]], return_tensors="pt")
    assert set(batch) >= {"input_ids", "attention_mask", "token_type_ids", "pixel_values"}
    assert tuple(batch["pixel_values"].shape) == (1, 3, tiny_assets.IMAGE_SIZE, tiny_assets.IMAGE_SIZE)
    ids = batch["input_ids"][0].tolist()
    boi = ids.index(tokenizer.boi_token_id)
    image_id = tokenizer.image_token_id
    assert ids[boi + 1 : boi + 6] == [image_id] * 4 + [tokenizer.eoi_token_id]
    assert ids.count(image_id) == tiny_assets.MM_TOKENS_PER_IMAGE
    assert batch["token_type_ids"][0].tolist() == [int(i == image_id) for i in ids]
    expanded = tokenizer.decode(ids[1:])
    assert "\n\n<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>\n\n" in expanded
    # As with the real model: the rendered template already starts with <bos> and the tokenizer
    # adds its own, so a caller must pass add_special_tokens=False to get a single one.
    assert ids[:2] == [2, 2]
    single = processor(text=[text], images=[[row["image"]]], add_special_tokens=False)["input_ids"][0]
    assert single == ids[1:]


def test_processor_chat_template_tokenize_has_single_bos(built_processor):
    """apply_chat_template(tokenize=True) drops the tokenizer's own <bos>, the template has one."""
    processor = built_processor
    row = tiny_assets.make_chart_rows(1, seed=1)[0]
    enc = processor.apply_chat_template(
        chart_messages(row, system="Answer briefly.", with_answer=False),
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = enc["input_ids"][0].tolist()
    assert ids[0] == 2 and ids.count(2) == 1
    assert "pixel_values" in enc and "token_type_ids" in enc


# --- model ---------------------------------------------------------------------------------------


def test_model_shape(built_model, tokenizer):
    """Small, wired to the tokenizer's ids, and stopping on <eos> or <end_of_turn>."""
    model = built_model
    config = model.config
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 2_000_000
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_index == tokenizer.image_token_id
    assert config.boi_token_index == tokenizer.boi_token_id
    assert config.eoi_token_index == tokenizer.eoi_token_id
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert list(model.generation_config.eos_token_id) == [1, end_of_turn]
    assert model.generation_config.pad_token_id == 0


def test_the_projector_the_library_zeroes_is_drawn_from_the_seed(tokenizer, built_model):
    """transformers leaves Gemma 3's multimodal projector all zero (its only such weight matrix), which would make the
    model blind; the builder draws it as the library draws the other weights, normal(0, 0.02), from the seed."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    as_initialised = Gemma3ForConditionalGeneration(tiny_assets.build_config(tokenizer))
    assert not as_initialised.model.multi_modal_projector.mm_input_projection_weight.any()
    redrawn = tiny_assets.redraw_zeroed_weights(as_initialised)
    assert redrawn == ["model.multi_modal_projector.mm_input_projection_weight"]
    projector = built_model.model.multi_modal_projector.mm_input_projection_weight
    assert abs(projector.mean().item()) < 0.002 and abs(projector.std().item() - 0.02) < 0.002
    assert not [name for name, p in built_model.named_parameters() if p.dim() >= 2 and not p.any()]
    again, other = (tiny_assets.build_model(tokenizer, seed=seed).model.multi_modal_projector for seed in (0, 1))
    assert torch.equal(again.mm_input_projection_weight, projector)
    assert not torch.equal(other.mm_input_projection_weight, projector)


def test_forward_loss_and_generate(built_model, built_processor):
    """A padded batch from the processor trains (finite loss, gradients) and generates."""
    model, processor = built_model, built_processor
    rows = tiny_assets.make_chart_rows(3, seed=2)
    texts = [processor.apply_chat_template(chart_messages(r), tokenize=False) for r in rows]
    batch = processor(
        text=texts, images=[[r["image"]] for r in rows], padding=True, add_special_tokens=False, return_tensors="pt"
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    try:
        out = model(**batch, labels=labels)
        assert math.isfinite(out.loss.item())
        # Random weights: the loss is about that of a uniform guess.
        assert abs(out.loss.item() - math.log(model.config.text_config.vocab_size)) < 1.5
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()

    prompt = processor.apply_chat_template(
        chart_messages(rows[0], with_answer=False),
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


# --- dataset -------------------------------------------------------------------------------------


def test_chart_rows():
    """ChartQA's schema, deterministic, answers that follow from the drawn bars."""
    rows = tiny_assets.make_chart_rows(40, seed=7)
    again = tiny_assets.make_chart_rows(40, seed=7)
    assert [(r["query"], r["label"]) for r in rows] == [(r["query"], r["label"]) for r in again]
    assert rows[0]["image"].tobytes() == again[0]["image"].tobytes()
    kinds = set()
    for row in rows:
        assert set(row) == {"image", "query", "label", "human_or_machine"}
        assert row["image"].mode == "RGB" and row["image"].size == tiny_assets.CHART_SIZE
        assert isinstance(row["label"], list) and len(row["label"]) == 1 and isinstance(row["label"][0], str)
        assert row["human_or_machine"] in (0, 1)
        kinds.add(row["query"].split(" bar")[0])
    assert len(kinds) >= 4
    assert tiny_assets.make_chart_rows(5, seed=8)[0]["image"].tobytes() != rows[0]["image"].tobytes()


# --- assets on disk ------------------------------------------------------------------------------


def test_assets_reload(cli_assets):
    """What write_assets saved loads back through the Auto classes and datasets, offline."""
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assets = cli_assets

    processor = AutoProcessor.from_pretrained(assets["model"])
    assert type(processor).__name__ == "Gemma3Processor"
    assert type(processor.tokenizer).__name__ == "GemmaTokenizerFast"
    assert processor.chat_template == tiny_assets.GEMMA3_CHAT_TEMPLATE
    assert processor.tokenizer.chat_template == tiny_assets.GEMMA3_CHAT_TEMPLATE
    assert processor.image_seq_length == tiny_assets.MM_TOKENS_PER_IMAGE
    assert processor.tokenizer("hi").input_ids[0] == 2
    assert processor.tokenizer.image_token == "<image_soft_token>"

    model = AutoModelForImageTextToText.from_pretrained(assets["model"])
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert model.config.image_token_index == processor.tokenizer.image_token_id
    assert os.path.isfile(os.path.join(assets["model"], "model.safetensors"))

    data = datasets.load_from_disk(assets["dataset"])
    assert {split: len(data[split]) for split in data} == {"train": 8, "val": 4, "test": 4}
    assert isinstance(data["train"].features["image"], datasets.Image)
    row = data["val"][0]
    assert row["image"].mode == "RGB" and isinstance(row["label"], list) and row["human_or_machine"] in (0, 1)
    from PIL import Image

    with Image.open(assets["image"]) as chart:  # the first test chart, for the README's one-question example
        assert np.array_equal(np.asarray(chart.convert("RGB")), np.asarray(data["test"][0]["image"]))

    batch = processor(
        text=[processor.apply_chat_template(chart_messages(row), tokenize=False)],
        images=[[row["image"]]],
        add_special_tokens=False,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert math.isfinite(out.loss.item())
