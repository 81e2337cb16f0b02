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
"""Checks that the tiny offline LLaVA-NeXT behaves like llava-hf/llava-v1.6-mistral-7b-hf.

Run offline: ``HF_HUB_OFFLINE=1 python -m pytest -q tests/test_tiny_llava_next.py`` (seconds).
"""

import math
import os

import pytest
import torch

import run_lora_vlm
import tiny_assets
import tiny_llava_next
from conftest import IGNORE_INDEX, make_collator, run_builder_cli, script_args

QUESTION = "How many bars are there?"
IMAGE_PROMPT = f"[INST] <image>\n{QUESTION} [/INST]"


def user_turn(text, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant_turn(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_llava_next.build_tokenizer()


@pytest.fixture(scope="module")
def built_processor(tokenizer):
    return tiny_llava_next.build_processor(tokenizer)


@pytest.fixture(scope="module")
def built_model(tokenizer):
    return tiny_llava_next.build_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory):
    """Assets written once through the command-line entry point."""
    out = tmp_path_factory.mktemp("tiny_llava_next")
    assert run_builder_cli(tiny_llava_next.main, "--output_dir", str(out)) == [str(out / "llava_next")]
    return {"model": str(out / "llava_next")}


# Tokenizer.


def test_special_token_ids(tokenizer):
    """Mistral's ids for <unk>/<s>/</s>, the byte tokens at 3..258, <image> and <pad> last."""
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tokenizer.convert_tokens_to_ids("<0x00>") == 3
    assert tokenizer.convert_tokens_to_ids("<0xFF>") == 258
    assert tokenizer.convert_tokens_to_ids("<0x0A>") == 13  # "\n", as in Mistral
    n = len(tokenizer)
    assert 600 < n < 1000
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == n - 2
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == n - 1
    assert tokenizer.padding_side == "left"
    for token in ("<unk>", "<s>", "</s>", "<image>", "<pad>"):
        assert token in tokenizer.all_special_tokens
    # [INST] is plain text in Mistral v0.2: no token of its own, cut into ordinary pieces.
    assert "[INST]" not in tokenizer.get_added_vocab()
    assert "[/INST]" not in tokenizer.get_added_vocab()
    assert tokenizer.unk_token_id not in tokenizer("[INST] x [/INST]").input_ids


def test_tokenizer_adds_bos_and_template_does_not(tokenizer, built_processor):
    """The tokenizer adds one <s>; the chat template never writes it, so keep add_special_tokens."""
    ids = tokenizer("Hello").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.bos_token_id not in tokenizer("Hello", add_special_tokens=False).input_ids
    assert tokenizer.eos_token_id not in ids  # add_eos_token=False

    prompt = built_processor.apply_chat_template([user_turn(QUESTION), assistant_turn("3")])
    assert "<s>" not in prompt and "bos_token" not in tiny_llava_next.LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE
    assert tokenizer(prompt).input_ids.count(tokenizer.bos_token_id) == 1
    # With add_special_tokens=False (right for Gemma 3, whose template writes <bos>) there is none.
    assert tokenizer(prompt, add_special_tokens=False).input_ids.count(tokenizer.bos_token_id) == 0
    # Writing "<s>" by hand and keeping add_special_tokens=True gives two.
    assert tokenizer("<s>" + prompt).input_ids[:2] == [1, 1]

    # tokenizer.apply_chat_template(tokenize=True) never adds special tokens: no <s> here!
    conversation = [user_turn(QUESTION, image=False)]
    assert tokenizer.bos_token_id not in tokenizer.apply_chat_template(conversation, tokenize=True)
    # processor.apply_chat_template(tokenize=True) adds them unless the prompt starts with <s>.
    encoded = built_processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert encoded["input_ids"][0][0] == tokenizer.bos_token_id
    assert encoded["input_ids"][0].count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "How many bars are there?",
        " leading and trailing spaces ",
        "two  spaces, a\ttab and\nnew\n\nlines",
        "Temperatures: 21.5 °C; café, naïve — 日本語 😀",
        "[INST] What is shown? [/INST] A chart.",
        "",
    ],
)
def test_plain_text_round_trips(tokenizer, text):
    """Without special tokens inside: exact with or without <s> skipped; "<s> " + text otherwise."""
    plain = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in plain  # byte fallback, never <unk>
    assert tokenizer.decode(plain, skip_special_tokens=False) == text
    with_bos = tokenizer(text).input_ids
    assert with_bos == [tokenizer.bos_token_id] + plain
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text
    assert tokenizer.decode(with_bos, skip_special_tokens=False) == ("<s> " + text if text else "<s>")


def test_text_after_special_tokens_gets_a_space(tokenizer):
    """Legacy Llama/Mistral behaviour: a "▁" is prepended to every stretch after a special token.

    "<image>\\n" is <image>, "▁", <0x0A> (the real model: 32000, 28705, 13), and decodes with an
    extra space; a prompt that starts with <image> gets no "▁" before it (real: 1, 32000, 28705, 13).
    """
    space = tokenizer.convert_tokens_to_ids("\u2581")
    image, newline = tokenizer.image_token_id, 13
    ids = tokenizer(IMAGE_PROMPT).input_ids
    at = ids.index(image)
    assert ids[at : at + 3] == [image, space, newline]
    assert tokenizer.decode(ids) == "<s> [INST] <image> \n" + QUESTION + " [/INST]"
    assert tokenizer("<image>\nQ").input_ids[:4] == [1, image, space, newline]
    assert tokenizer.decode(tokenizer("A</s>").input_ids) == "<s> A</s>"
    assert tokenizer.decode(tokenizer("A</s> [INST] B").input_ids) == "<s> A</s>  [INST] B"


# Chat template.


def test_chat_template_is_the_real_one(tokenizer, built_processor):
    template = tiny_llava_next.LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE
    assert built_processor.chat_template == template
    assert tokenizer.chat_template == template


def test_chat_template_renders_turns(built_processor):
    render = built_processor.apply_chat_template
    single = [user_turn(QUESTION), assistant_turn("3")]
    assert render(single) == "[INST] <image>\nHow many bars are there? [/INST] 3</s> "
    two = single + [user_turn("Which bar is the tallest?", image=False), assistant_turn("B")]
    assert render(two) == (
        "[INST] <image>\nHow many bars are there? [/INST] 3</s> "
        "[INST] Which bar is the tallest? [/INST] B</s> "
    )
    # No generation-prompt branch: the prompt simply ends after " [/INST]".
    assert render(single[:1], add_generation_prompt=True) == IMAGE_PROMPT
    assert render(single[:1], add_generation_prompt=False) == IMAGE_PROMPT
    # Images first, whatever their place in the content; a system turn in <<SYS>> markers.
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    late_image = {"role": "user", "content": [{"type": "text", "text": "Q?"}, {"type": "image"}]}
    assert render([system, late_image]) == "<<SYS>>\nBe brief.\n<</SYS>>\n\n[INST] <image>\nQ? [/INST]"


def test_chat_template_needs_list_content(built_processor):
    """A plain-string user content renders no text at all; a plain-string answer raises."""
    render = built_processor.apply_chat_template
    assert render([{"role": "user", "content": QUESTION}]) == "[INST]  [/INST]"
    with pytest.raises(Exception, match="has no attribute 'text'"):
        render([user_turn(QUESTION), {"role": "assistant", "content": "3"}])


# Images.


@pytest.mark.parametrize(
    "size, expected_tokens, expected_tiles",
    [
        # (width, height). 96x64: best pinpoint 64x64 = 2x2 tiles = 8x8 features; the image fills
        # 64x42 of it -> 6 feature rows kept x 8 columns = 48, + 6 row newlines, + 16 base = 70.
        ((96, 64), 70, 5),
        # 64x96: 8 rows x 6 columns = 48, + 8 newlines, + 16 base = 72.
        ((64, 96), 72, 5),
        # 32x32: pinpoint 32x64 (first of two ties), 4 rows x 4 columns + 4 newlines + 16 = 36.
        ((32, 32), 36, 3),
        # 64x32: pinpoint 32x64 exactly, 4 rows x 8 columns + 4 newlines + 16 = 52.
        ((64, 32), 52, 3),
    ],
)
def test_image_token_expansion(tokenizer, built_processor, built_model, size, expected_tokens, expected_tiles):
    """Each <image> becomes as many tokens as the model makes features for that image size."""
    from PIL import Image

    image = Image.new("RGB", size, (200, 30, 30))
    out = built_processor(text=IMAGE_PROMPT, images=image, return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert int((out["input_ids"] == tokenizer.image_token_id).sum()) == expected_tokens
    assert tuple(out["pixel_values"].shape) == (1, expected_tiles, 3, 32, 32)
    assert out["image_sizes"].tolist() == [[size[1], size[0]]]  # (height, width) of the original
    # The processor's own counter for a size agrees with the expansion.
    counted = built_processor._get_num_multimodal_tokens(image_sizes=[[size[1], size[0]]])
    assert counted.num_image_tokens == [expected_tokens]
    # And the model packs exactly that many feature vectors for this image.
    with torch.no_grad():
        features = built_model.get_image_features(out["pixel_values"], out["image_sizes"])
    assert [f.shape[0] for f in features] == [expected_tokens]


def test_chart_sizes(chart_rows):
    assert all(row["image"].size == tiny_assets.CHART_SIZE == (96, 64) for row in chart_rows)


# Labels.


def test_single_turn_mask_written_by_hand(cli_assets):
    """The script's collator (with the processor it loads) trains " 3</s>": the "▁" of the space the template writes
    before the answer, the answer and </s>; not the prompt, the image tokens, nor the two "▁" after </s> (one the
    tokenizer puts in front of text that follows a special token, one for the template's trailing space)."""
    from PIL import Image

    processor = run_lora_vlm.load_processor(run_lora_vlm.ModelArguments(model_name_or_path=cli_assets["model"]))[2]
    collator = make_collator(processor, script_args().data, ["image", "question", "answer"], family="llava_next")
    chart = Image.new("RGB", tiny_assets.CHART_SIZE, (255, 0, 0))  # 96x64: 70 image tokens
    row = {"image": chart, "question": "How many bars?", "answer": "3"}
    batch = collator([{"row": row, "split": "train", "row_index": 0}])
    expected_tokens = (
        ["<s>", "▁[INST]", "▁"] + ["<image>"] * 70
        + ["▁", "<0x0A>", "H", "ow", "▁many", "▁bars", "?", "▁[/INST]", "▁", "3", "</s>", "▁", "▁"]
    )
    expected_trained = [None] * (len(expected_tokens) - 5) + ["▁", "3", "</s>", None, None]
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert tokens == expected_tokens
    assert [None if label == IGNORE_INDEX else token for token, label in zip(tokens, batch["labels"][0].tolist())] == (
        expected_trained
    )
    assert batch["attention_mask"].tolist() == [[1] * len(expected_tokens)]
    assert batch["image_sizes"].tolist() == [[64, 96]]


# Model.


def _chart_batch(processor, chart_rows):
    """Training-style batch: a 96x64 chart, a 64x96 one, and a 32x32 image (3 tiles, padded to 5)."""
    from PIL import Image

    images = [
        chart_rows[0]["image"],
        chart_rows[1]["image"].transpose(Image.Transpose.TRANSPOSE),
        chart_rows[2]["image"].resize((32, 32)),
    ]
    texts = [
        processor.apply_chat_template([user_turn(row["query"]), assistant_turn(row["label"][0])])
        for row in chart_rows[:3]
    ]
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch, labels


def test_forward_gives_finite_loss(tokenizer, built_processor, built_model, chart_rows):
    batch, labels = _chart_batch(built_processor, chart_rows)
    assert tuple(batch["pixel_values"].shape) == (3, 5, 3, 32, 32)
    counts = (batch["input_ids"] == tokenizer.image_token_id).sum(dim=1).tolist()
    assert counts == [70, 72, 36]
    # Left padding with <pad>, one <s> per row.
    assert (batch["input_ids"][:, -1] != tokenizer.pad_token_id).all()
    assert ((batch["input_ids"] == tokenizer.bos_token_id).sum(dim=1) == 1).all()
    with torch.no_grad():
        out = built_model(**batch, labels=labels)
    assert math.isfinite(out.loss.item())
    assert out.logits.shape[-1] == len(tokenizer)
    # The placeholder check is live: one image token too few is refused.
    broken = batch["input_ids"].clone()
    broken[0, (broken[0] == tokenizer.image_token_id).nonzero()[0, 0]] = tokenizer.unk_token_id
    with torch.no_grad(), pytest.raises(ValueError, match="Image features and image tokens do not match"):
        built_model(**{**batch, "input_ids": broken})


def test_config_matches_processor(tokenizer, built_processor, built_model):
    config = built_model.config
    assert config.model_type == "llava_next"
    assert config.text_config.model_type == "mistral" and config.vision_config.model_type == "clip_vision_model"
    assert config.image_token_index == tokenizer.image_token_id
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_grid_pinpoints == built_processor.image_processor.image_grid_pinpoints
    assert config.vision_config.image_size == built_processor.image_processor.crop_size["height"]
    assert config.vision_config.patch_size == built_processor.patch_size
    assert config.vision_feature_select_strategy == built_processor.vision_feature_select_strategy == "default"
    assert built_processor.num_additional_image_tokens == 1  # CLIP's CLS
    generation = built_model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
    assert generation.pad_token_id == tokenizer.pad_token_id
    assert generation.do_sample is False


def test_generate(tokenizer, built_processor, built_model, chart_rows):
    prompt = built_processor.apply_chat_template([user_turn(chart_rows[0]["query"])])
    inputs = built_processor(text=prompt, images=chart_rows[0]["image"], return_tensors="pt")
    with torch.no_grad():
        out = built_model.generate(**inputs, max_new_tokens=4)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 4
    assert out[0, : inputs["input_ids"].shape[1]].tolist() == inputs["input_ids"][0].tolist()


def test_deterministic_for_a_seed(tokenizer, built_model):
    again = tiny_llava_next.build_model(tokenizer, seed=0)
    for (name, a), (_, b) in zip(built_model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_library_leaves_no_weight_matrix_at_zero(tokenizer, built_model):
    """Unlike Gemma 3's, the projector comes out of transformers' own initialisation random: nothing to redraw."""
    from transformers import LlavaNextForConditionalGeneration

    as_initialised = LlavaNextForConditionalGeneration(tiny_llava_next.build_config(tokenizer))
    assert tiny_assets.redraw_zeroed_weights(as_initialised) == []
    weight = built_model.model.multi_modal_projector.linear_2.weight
    assert abs(weight.mean().item()) < 0.002 and abs(weight.std().item() - 0.02) < 0.002


# Saved assets.


def test_reload_with_auto_classes(cli_assets, tokenizer, built_processor, chart_rows):
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaNextForConditionalGeneration

    path = cli_assets["model"]
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == "llava_next"

    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert type(processor.tokenizer).__name__ == "LlamaTokenizerFast"
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessor"  # no torchvision needed
    assert processor.chat_template == tiny_llava_next.LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE
    assert (processor.patch_size, processor.num_additional_image_tokens) == (8, 1)
    assert processor.tokenizer.image_token_id == tokenizer.image_token_id
    assert processor.tokenizer.padding_side == "left"

    model = AutoModelForImageTextToText.from_pretrained(path)
    assert isinstance(model, LlavaNextForConditionalGeneration)
    assert model.config.model_type == "llava_next"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    text = processor.apply_chat_template([user_turn(chart_rows[0]["query"]), assistant_turn(chart_rows[0]["label"][0])])
    reloaded = processor(text=text, images=chart_rows[0]["image"], return_tensors="pt")
    built = built_processor(text=text, images=chart_rows[0]["image"], return_tensors="pt")
    assert reloaded["input_ids"].tolist() == built["input_ids"].tolist()
    assert torch.allclose(reloaded["pixel_values"], built["pixel_values"])
    fresh = tiny_llava_next.build_model(tokenizer, seed=0)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**reloaded).logits, fresh(**built).logits, atol=1e-5)
