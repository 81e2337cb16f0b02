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
"""Checks that the tiny offline Qwen2.5-VL behaves like Qwen/Qwen2.5-VL-*-Instruct.

The processor checks run on the processor the training script loads from the files the builder writes.
Run offline: ``HF_HUB_OFFLINE=1 python -m pytest -q tests/test_tiny_qwen2_5_vl.py`` (seconds).
"""

import json
import math
import os
import unicodedata

import pytest
import torch

import run_lora_vlm
import tiny_assets
import tiny_qwen2_5_vl as tiny_qwen
from conftest import IGNORE_INDEX, make_collator, run_builder_cli, script_args
from tiny_assets import chart_messages

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_qwen.build_tokenizer()


@pytest.fixture(scope="module")
def built_model(tokenizer):
    return tiny_qwen.build_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory):
    """Assets written once through the command-line entry point."""
    out = tmp_path_factory.mktemp("tiny_qwen")
    assert run_builder_cli(tiny_qwen.main, "--output_dir", str(out)) == [str(out / "qwen2_5_vl")]
    return {"model": str(out / "qwen2_5_vl")}


@pytest.fixture(scope="module")
def loaded_processor(cli_assets):
    """The processor as the training script loads the saved files (without its video half where torchvision is
    missing)."""
    return run_lora_vlm.load_processor(run_lora_vlm.ModelArguments(model_name_or_path=cli_assets["model"]))[2]


def image_token_count(processor, processed):
    """Image tokens each image of a processed batch expands to."""
    return [int(thw.prod()) // processor.image_processor.merge_size**2 for thw in processed["image_grid_thw"]]


# --- tokenizer -----------------------------------------------------------------------------------


def test_special_tokens_follow_the_bpe_pieces_in_qwen_order(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(tok) for tok in tiny_qwen.SPECIAL_TOKENS]
    # <|endoftext|> is the first id after the byte-level BPE vocabulary, the rest follow in order.
    assert ids == list(range(len(tokenizer) - len(ids), len(tokenizer)))
    assert ids[0] == tiny_qwen.BPE_VOCAB_SIZE
    for tok in tiny_qwen.SPECIAL_TOKENS:
        assert tokenizer(tok, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(tok)]
    assert set(tiny_qwen.SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)


def test_pad_eos_and_no_bos_or_unk(tokenizer):
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token is None and tokenizer.bos_token_id is None
    assert tokenizer.unk_token is None
    plain = tokenizer("Which bar is the tallest?", add_special_tokens=False)["input_ids"]
    assert tokenizer("Which bar is the tallest?")["input_ids"] == plain  # nothing added, no BOS/EOS
    assert plain[0] not in tokenizer.all_special_ids


@pytest.mark.parametrize(
    "text",
    [
        "How many bars are there?",
        " leading space,  two spaces\tand a tab\n\n\nnewlines ",
        "Temperatures: 21.5 °C, 70 °F; café, naïve, résumé — déjà vu.",
        "日本語のテキスト 🙂 emoji, Ωmega, ünïcödé",
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n",
        "0123456789 {}[]()<>|~^`'\"\\",
    ],
)
def test_decode_round_trips_text(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    # Byte-level BPE: every id is a real piece, never an unknown token.
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_text_is_nfc_normalised_like_qwen(tokenizer):
    decomposed = "cafe\u0301"  # 'e' + combining acute accent
    assert tokenizer.decode(tokenizer(decomposed)["input_ids"]) == unicodedata.normalize("NFC", decomposed)


def test_spaces_are_part_of_the_following_word(tokenizer):
    # Qwen2's pre-tokeniser: " word" is one pre-token, so its pieces start with "Ġ" (a space).
    pieces = tokenizer.tokenize("bar value")
    assert any(piece.startswith("\u0120") for piece in pieces[1:])
    assert not pieces[0].startswith("\u0120")


# --- chat template -------------------------------------------------------------------------------


def test_template_adds_default_system_prompt_vision_tokens_and_generation_prompt(loaded_processor, chart_rows):
    row = chart_rows[0]
    text = loaded_processor.apply_chat_template(chart_messages(row, with_answer=False), add_generation_prompt=True)
    assert text == f"{SYSTEM}<|im_start|>user\n{IMAGE}{row['query']}<|im_end|>\n<|im_start|>assistant\n"


def test_template_renders_each_turn_with_im_end_newline(loaded_processor, chart_rows):
    row = chart_rows[1]
    text = loaded_processor.apply_chat_template(chart_messages(row, system="Answer briefly."))
    assert text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE}{row['query']}<|im_end|>\n"
        f"<|im_start|>assistant\n{row['label'][0]}<|im_end|>\n"
    )
    # String content and add_vision_id, as in the real template.
    text = loaded_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_vision_id=True
    )
    assert text == f"{SYSTEM}<|im_start|>user\nPicture 1: {IMAGE}Hi<|im_end|>\n"
    assert loaded_processor.apply_chat_template([{"role": "user", "content": " Hi "}]) == (
        f"{SYSTEM}<|im_start|>user\n Hi <|im_end|>\n"
    )


def test_template_treats_any_item_with_an_image_key_as_an_image(loaded_processor):
    # Real-template behaviour worth knowing: rows that went through `datasets` get every key on
    # every content item, and a text item carrying "image": None renders as an image.
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi", "image": None}]}]
    assert loaded_processor.apply_chat_template(messages) == f"{SYSTEM}<|im_start|>user\n{IMAGE}<|im_end|>\n"


def test_tokenizer_and_processor_share_the_template(tokenizer, loaded_processor):
    assert tokenizer.chat_template == loaded_processor.chat_template == tiny_qwen.QWEN2_5_VL_CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == f"{SYSTEM}<|im_start|>user\nHello<|im_end|>\n"


# --- processor -----------------------------------------------------------------------------------


def test_chart_becomes_six_image_tokens(loaded_processor, chart_rows):
    row = chart_rows[0]
    assert row["image"].size == tiny_assets.CHART_SIZE == (96, 64)
    text = loaded_processor.apply_chat_template(chart_messages(row))
    out = loaded_processor(text=[text], images=[row["image"]], return_tensors="pt")
    # 96x64 -> 84x56 (multiples of 28) -> 6x4 patches of 14 -> 3x2 merged tokens.
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert out["pixel_values"].shape == (24, 3 * 2 * 14 * 14)  # one row per patch, not per image
    assert image_token_count(loaded_processor, out) == [6]
    ids = out["input_ids"][0].tolist()
    image_id = loaded_processor.image_token_id
    start = ids.index(loaded_processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    assert ids[start + 1 : start + 7] == [image_id] * 6
    assert ids[start + 7] == loaded_processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert "token_type_ids" not in out
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}


def test_processor_expands_each_image_by_its_own_grid(loaded_processor, chart_rows):
    images = [chart_rows[0]["image"], chart_rows[1]["image"].resize((200, 300)), chart_rows[2]["image"]]
    texts = [f"<|im_start|>user\n{IMAGE}{IMAGE}Compare<|im_end|>\n", f"<|im_start|>user\n{IMAGE}One<|im_end|>\n"]
    loaded_processor.tokenizer.padding_side = "right"
    out = loaded_processor(text=texts, images=images, padding=True, return_tensors="pt")
    counts = image_token_count(loaded_processor, out)
    assert out["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 6], [1, 4, 6]]
    assert counts == [6, 12, 6]
    per_row = (out["input_ids"] == loaded_processor.image_token_id).sum(dim=1).tolist()
    assert per_row == [counts[0] + counts[1], counts[2]]
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(dim=1).sum())
    # Larger images are capped at MAX_PIXELS, i.e. 16 image tokens.
    big = loaded_processor(text=[IMAGE], images=[chart_rows[0]["image"].resize((960, 640))], return_tensors="pt")
    assert image_token_count(loaded_processor, big)[0] <= 16


def test_tokenized_chat_template_matches_manual_processing(loaded_processor, chart_rows):
    row = chart_rows[2]
    messages = chart_messages(row)
    via_template = loaded_processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    text = loaded_processor.apply_chat_template(messages)
    manual = loaded_processor(text=[text], images=[row["image"]], return_tensors="pt")
    assert torch.equal(via_template["input_ids"], manual["input_ids"])
    assert torch.equal(via_template["image_grid_thw"], manual["image_grid_thw"])
    assert torch.allclose(via_template["pixel_values"], manual["pixel_values"])


# --- labels --------------------------------------------------------------------------------------


def test_single_turn_mask_written_by_hand(loaded_processor):
    """The script's collator trains the answer and <|im_end|>: not the template's default system turn, the prompt, the
    image tokens, nor the newline the template writes after <|im_end|>."""
    from PIL import Image

    collator = make_collator(loaded_processor, script_args().data, ["image", "question", "answer"], family="qwen2_5_vl")
    chart = Image.new("RGB", tiny_assets.CHART_SIZE, (255, 0, 0))  # 96x64: 6 image tokens
    row = {"image": chart, "question": "How many bars?", "answer": "3"}
    batch = collator([{"row": row, "split": "train", "row_index": 0}])
    expected_tokens = (
        ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", ".", "<|im_end|>", "Ċ"]
        + ["<|im_start|>", "user", "Ċ", "<|vision_start|>"] + ["<|image_pad|>"] * 6 + ["<|vision_end|>"]
        + ["How", "Ġmany", "Ġbars", "?", "<|im_end|>", "Ċ"]
        + ["<|im_start|>", "assistant", "Ċ", "3", "<|im_end|>", "Ċ"]
    )
    expected_trained = [None] * (len(expected_tokens) - 3) + ["3", "<|im_end|>", None]
    tokens = loaded_processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens == expected_tokens
    assert [None if label == IGNORE_INDEX else token for token, label in zip(tokens, batch["labels"][0].tolist())] == (
        expected_trained
    )
    assert batch["attention_mask"].tolist() == [[1] * len(expected_tokens)]
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]]


# --- model ---------------------------------------------------------------------------------------


def test_config_is_wired_to_the_tokenizer_and_image_processor(tokenizer, loaded_processor, built_model):
    config = built_model.config
    text, vision = config.text_config, config.vision_config
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tiny_qwen.SPECIAL_TOKENS}
    assert config.model_type == "qwen2_5_vl"
    assert config.image_token_id == ids["<|image_pad|>"] == loaded_processor.image_token_id
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert config.vocab_size == text.vocab_size == len(tokenizer)  # top level too, as the loss reads it
    assert 2 * sum(text.rope_scaling["mrope_section"]) == text.hidden_size // text.num_attention_heads
    image_processor = loaded_processor.image_processor
    assert vision.patch_size == image_processor.patch_size
    assert vision.spatial_merge_size == image_processor.merge_size
    assert vision.temporal_patch_size == image_processor.temporal_patch_size
    assert vision.out_hidden_size == text.hidden_size
    assert all(0 <= i < vision.depth for i in vision.fullatt_block_indexes)
    assert vision.window_size // vision.spatial_merge_size // vision.patch_size >= 1
    generation = built_model.generation_config
    assert generation.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert generation.pad_token_id == ids["<|endoftext|>"]
    assert sum(p.numel() for p in built_model.parameters()) < 500_000


def test_the_library_leaves_no_weight_matrix_at_zero(tokenizer, built_model):
    """Unlike Gemma 3's, the projector (the patch merger) comes out of transformers' own initialisation random."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    as_initialised = Qwen2_5_VLForConditionalGeneration(tiny_qwen.build_config(tokenizer))
    assert tiny_assets.redraw_zeroed_weights(as_initialised) == []
    weight = built_model.model.visual.merger.mlp[2].weight
    assert abs(weight.mean().item()) < 0.002 and abs(weight.std().item() - 0.02) < 0.002


def test_forward_gives_finite_loss_and_images_reach_it(loaded_processor, built_model, chart_rows):
    texts = [loaded_processor.apply_chat_template(chart_messages(row)) for row in chart_rows[:2]]
    loaded_processor.tokenizer.padding_side = "right"
    batch = loaded_processor(text=texts, images=[row["image"] for row in chart_rows[:2]], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    built_model.zero_grad()
    out = built_model(**batch, labels=labels)
    assert math.isfinite(out.loss.item())
    assert out.logits.shape == (*batch["input_ids"].shape, len(loaded_processor.tokenizer))
    # M-RoPE: 6 image tokens take 3 positions (max of the 3x2 merged grid), so the text after them
    # is shifted by rope_deltas = 3 - 6 = -3 in the first (unpadded) row.
    assert out.rope_deltas.shape == (2, 1)
    assert out.rope_deltas[0].item() == -3
    out.loss.backward()
    grad = built_model.model.visual.patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    built_model.zero_grad()


def test_generate_stops_and_left_padding_matches_single_rows(loaded_processor, built_model, chart_rows):
    prompts = [
        loaded_processor.apply_chat_template(chart_messages(row, with_answer=False), add_generation_prompt=True)
        for row in chart_rows[:2]
    ]
    prompts[1] = prompts[1].replace("?", "? Answer with a single word or number.")
    images = [row["image"] for row in chart_rows[:2]]
    tokenizer = loaded_processor.tokenizer
    tokenizer.padding_side = "left"
    try:
        batch = loaded_processor(text=prompts, images=images, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        together = built_model.generate(**batch, max_new_tokens=4)[:, batch["input_ids"].shape[1] :]
        for i in range(2):
            single = loaded_processor(text=[prompts[i]], images=[images[i]], return_tensors="pt")
            alone = built_model.generate(**single, max_new_tokens=4)[:, single["input_ids"].shape[1] :]
            assert together[i, : alone.shape[1]].tolist() == alone[0].tolist()


# --- saved assets --------------------------------------------------------------------------------


def test_saved_files_look_like_a_qwen2_5_vl_checkpoint(cli_assets):
    path = cli_assets["model"]
    names = set(os.listdir(path))
    assert {"config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    with open(os.path.join(path, "preprocessor_config.json")) as f:
        preprocessor = json.load(f)
    assert preprocessor["processor_class"] == "Qwen2_5_VLProcessor"
    assert preprocessor["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (preprocessor["min_pixels"], preprocessor["max_pixels"]) == (tiny_qwen.MIN_PIXELS, tiny_qwen.MAX_PIXELS)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


def test_the_script_loads_the_saved_processor_and_model(cli_assets, tokenizer, built_model, loaded_processor, chart_rows):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLProcessor
    from transformers.utils import is_torchvision_available

    path = cli_assets["model"]
    assert AutoConfig.from_pretrained(path).model_type == "qwen2_5_vl"
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    model.eval()

    if not is_torchvision_available():
        # transformers 4.55 cannot build Qwen2.5-VL's processor without torchvision (its video processor needs
        # it), for this model as for the real ones: the reason the script has an image-only fallback.
        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(path)
    processor = loaded_processor
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"  # slow, no torchvision needed
    def settings(image_processor):
        return {k: v for k, v in image_processor.to_dict().items() if k not in ("processor_class", "_processor_class")}

    assert settings(processor.image_processor) == settings(tiny_qwen.build_image_processor())
    assert processor.chat_template == tiny_qwen.QWEN2_5_VL_CHAT_TEMPLATE
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert processor.tokenizer.bos_token is None and processor.tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == built_model.generation_config.eos_token_id

    row = chart_rows[3]
    text = processor.apply_chat_template(chart_messages(row))
    batch = processor(text=[text], images=[row["image"]], return_tensors="pt")
    # The built tokenizer's ids for the text, once the 96x64 chart's <|image_pad|> stands for its 6 tokens.
    expanded = text.replace(tiny_qwen.IMAGE_PAD, tiny_qwen.IMAGE_PAD * 6)
    assert batch["input_ids"][0].tolist() == tokenizer(expanded)["input_ids"]
    with torch.no_grad():
        reloaded = model(**batch, labels=batch["input_ids"])
        original = built_model(**batch, labels=batch["input_ids"])
    assert math.isfinite(reloaded.loss.item())
    assert torch.allclose(reloaded.logits, original.logits, atol=1e-5)
