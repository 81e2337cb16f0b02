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
"""Tiny, offline stand-in for Qwen/Qwen2.5-VL-*-Instruct.

Everything here is built on the spot, without a model hub or internet, in a few seconds on a
CPU; the training data is ``tiny_assets``'s ChartQA-like bar charts (96x64 PNGs), so only the
model side is new:

* ``build_tokenizer()``: a byte-level BPE tokenizer trained with the ``tokenizers`` library
  (Qwen2's NFC normaliser, pre-tokenising regex and byte-level alphabet), wrapped as a
  ``Qwen2TokenizerFast`` with Qwen2.5-VL's special tokens after the BPE pieces
  (``<|endoftext|>`` first, as in Qwen), no BOS, eos ``<|im_end|>``, pad ``<|endoftext|>`` and
  Qwen2.5-VL-Instruct's real chat template.
* ``build_image_processor()``: a (slow) ``Qwen2VLImageProcessor`` with Qwen's patch size 14 and
  merge size 2 but a small pixel budget: a 96x64 chart is resized to 84x56, a 6x4 grid of patches,
  i.e. 6 ``<|image_pad|>`` tokens.
* ``build_model(tokenizer)``: a randomly initialised ``Qwen2_5_VLForConditionalGeneration``
  (about 0.2 M parameters) with M-RoPE, a windowed and a full-attention vision block.
* ``write_assets(output_dir)``: saves the model, and the processor's files (tokenizer, image processor
  and chat template, naming ``Qwen2_5_VLProcessor`` as their processor class), as the real checkpoints
  ship them, so that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load them offline.

Command line::

    python tests/tiny_qwen2_5_vl.py --output_dir DIR [--seed 0]

No processor object is built here: transformers 4.55's ``Qwen2_5_VLProcessor`` requires a video
processor, whose only implementation (``Qwen2VLVideoProcessor``) needs torchvision. The files are
written part by part instead, exactly as the processor's ``save_pretrained`` would; the tests check
that the training script loads them, with or without torchvision.
"""

import os

import tiny_assets

# Qwen2.5-VL-Instruct's chat template, exactly as Qwen/Qwen2.5-VL-*-Instruct ship it in
# chat_template.json (the template the processor applies). It is data, not code: the fine-tuning
# script must see the very prompt layout of the real model (a default system turn when none is
# given, content items rendered without trimming, an image as <|vision_start|><|image_pad|>
# <|vision_end|>, "<|im_end|>\n" after every turn). Note its image test: an item is an image if
# its type is "image" *or* it merely has an "image" / "image_url" key, whatever the value.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-VL's special tokens in the real order (ids 151643..151656 there; here they follow the
# BPE pieces the same way, so <|endoftext|> is the first id after the byte-level vocabulary).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
]

# Qwen2's pre-tokenising regex (tokenizer.json of every Qwen2/2.5 model): contractions, letters
# with at most one leading non-letter, single digits, punctuation runs, newlines, spaces.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Size of the tiny world. 256 byte symbols plus a few hundred merges.
BPE_VOCAB_SIZE = 640
# Vision: Qwen's own patch (14), temporal patch (2) and merge (2) sizes, so one image token covers
# 28x28 pixels. Qwen's min_pixels (56*56), but at most 16 image tokens (28*28*16 pixels) instead of
# 16384: a 96x64 chart is resized to 84x56 = 6x4 patches = 3x2 merged tokens = 6 <|image_pad|>.
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16
# The vision tower attends within windows of WINDOW_SIZE pixels (2x2 merged tokens here) except in
# the blocks of FULLATT_BLOCK_INDEXES, as Qwen2.5-VL's (112 pixels, blocks 7/15/23/31 of 32).
WINDOW_SIZE = 56
VISION_DEPTH = 2
FULLATT_BLOCK_INDEXES = [1]
# Text: head_dim 64 / 2 = 32, so M-RoPE's (temporal, height, width) sections must sum to 32 / 2 = 16
# (Qwen2.5-VL's are [16, 24, 24] for head_dim 128: the same 2:3:3 split).
TEXT_HIDDEN = 64
TEXT_HEADS = 2
MROPE_SECTION = [4, 6, 6]


def _training_corpus():
    """``tiny_assets``' sentences plus Qwen's chat markup words, so BPE learns useful merges."""
    lines = list(tiny_assets.training_corpus())
    lines += [
        "system\nYou are a helpful assistant.",
        "user\nWhat is shown?\n",
        "assistant\nA bar chart.\n",
        "Picture 1: Video 1: ",
    ]
    return lines


def build_tokenizer():
    """Build a tiny Qwen2.5-VL-like fast tokenizer (``Qwen2TokenizerFast``) offline.

    Layout of the ids: the 256 byte-level symbols and the trained merges, then Qwen2.5-VL's
    special tokens in their real order. Byte-level BPE, so any (NFC) text round-trips.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers
    from transformers import Qwen2TokenizerFast

    # Qwen2's tokenizer.json: NFC, split with the regex, then map bytes to printable symbols
    # (no prefix space); the decoder maps them back; the post-processor adds nothing (no BOS/EOS).
    core = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    core.train_from_iterator(_training_corpus(), trainer=trainer)
    # Added after training so they come last, as in Qwen; normalized=False keeps them whole.
    core.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])

    # As Qwen2.5-VL's tokenizer_config.json: no bos and no unk, eos <|im_end|>, pad <|endoftext|>.
    return Qwen2TokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_image_processor():
    """Return a slow ``Qwen2VLImageProcessor`` with Qwen's settings but a tiny pixel budget.

    Bicubic resize to multiples of 28 within [MIN_PIXELS, MAX_PIXELS], rescale 1/255, CLIP mean
    and std, RGB; the output is one row of 3*2*14*14 values per patch, patches of a merged 2x2
    group adjacent, plus each image's (t, h, w) grid in patches.
    """
    from transformers import Qwen2VLImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    # min_pixels/max_pixels rather than `size`: transformers 4.55's __init__ ignores a `size`
    # argument (it always starts from the 56*56 .. 28*28*1280 default) and only honours these.
    return Qwen2VLImageProcessor(
        do_resize=True,
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
    )


def write_processor_files(tokenizer, image_processor, model_dir):
    """Write what ``Qwen2_5_VLProcessor.save_pretrained`` writes: the tokenizer's files with the chat
    template (chat_template.jinja) and preprocessor_config.json, both naming the processor class, as
    ProcessorMixin.save_pretrained does (transformers 4.55, processing_utils.py:710-711)."""
    for part in (tokenizer, image_processor):
        part._set_processor_class("Qwen2_5_VLProcessor")
        part.save_pretrained(model_dir)
    return model_dir


def _token_ids(tokenizer):
    """The ids the model config needs, looked up in ``tokenizer``."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    return {
        "endoftext": ids[ENDOFTEXT],
        "im_end": ids[IM_END],
        "vision_start": ids[VISION_START],
        "vision_end": ids[VISION_END],
        "vision_pad": ids["<|vision_pad|>"],
        "image_pad": ids[IMAGE_PAD],
        "video_pad": ids[VIDEO_PAD],
    }


def build_config(tokenizer):
    """Return a tiny ``Qwen2_5_VLConfig`` wired to ``tokenizer``'s ids."""
    from transformers import Qwen2_5_VLConfig

    ids = _token_ids(tokenizer)
    head_dim = TEXT_HIDDEN // TEXT_HEADS
    assert 2 * sum(MROPE_SECTION) == head_dim, "mrope_section must sum to head_dim / 2"
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        # M-RoPE: the rotary frequencies are split into temporal/height/width sections.
        "rope_scaling": {"type": "mrope", "mrope_section": list(MROPE_SECTION)},
        "use_sliding_window": False,
        "max_window_layers": 2,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["endoftext"],
        "eos_token_id": ids["im_end"],
        "pad_token_id": ids["endoftext"],
        "image_token_id": ids["image_pad"],
        "video_token_id": ids["video_pad"],
    }
    vision_config = {
        "depth": VISION_DEPTH,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "tokens_per_second": 2,
        "window_size": WINDOW_SIZE,
        "fullatt_block_indexes": list(FULLATT_BLOCK_INDEXES),
        # The patch merger projects straight into the language model's embedding space.
        "out_hidden_size": TEXT_HIDDEN,
    }
    # Flat, as Qwen2.5-VL's config.json: the text settings and the ids at the top level (the
    # config builds its text_config from them). Not cosmetic: in transformers 4.55 the model's
    # forward reads `config.vocab_size` from the top level to compute the loss, which a config
    # given only a nested text_config lacks (AttributeError as soon as labels are passed).
    # get_rope_index reads vision_start_token_id to find images and image_token_id /
    # video_token_id to place their embeddings.
    return Qwen2_5_VLConfig(
        vision_config=vision_config,
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
        vision_token_id=ids["vision_pad"],
        **text_config,
    )


def build_generation_config(tokenizer):
    """Return a ``GenerationConfig`` stopping on ``<|im_end|>`` or ``<|endoftext|>`` like Qwen's.

    """
    ids = _token_ids(tokenizer)
    return tiny_assets.greedy_generation_config(
        bos_token_id=ids["endoftext"], eos_token_id=[ids["im_end"], ids["endoftext"]], pad_token_id=ids["endoftext"]
    )


def build_model(tokenizer, seed=0):
    """Return a tiny randomly initialised ``Qwen2_5_VLForConditionalGeneration`` (float32, eval)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return tiny_assets.random_model(
        Qwen2_5_VLForConditionalGeneration, build_config(tokenizer), build_generation_config(tokenizer), seed
    )


def write_assets(output_dir, seed=0):
    """Write ``output_dir/qwen2_5_vl`` (model + processor files); returns {"model": path}.

    The training data is ``tiny_assets``' ChartQA-like dataset (``tiny_assets.write_assets`` or
    ``build_chartqa``); nothing here is specific to Gemma in it.
    """
    model_dir = os.path.join(output_dir, "qwen2_5_vl")
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=seed).save_pretrained(model_dir, safe_serialization=True)
    return {"model": write_processor_files(tokenizer, build_image_processor(), model_dir)}


def main(argv=None):
    """Command line entry point: write the assets and print the model folder."""
    tiny_assets.run_builder_cli(__doc__, write_assets, argv)


if __name__ == "__main__":
    main()
