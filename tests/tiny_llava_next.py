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
"""Tiny, offline stand-in for llava-hf/llava-v1.6-mistral-7b-hf (LLaVA-NeXT on Mistral 7B v0.2).

Everything here is built on the spot, without a model hub or internet, in a few seconds on a CPU,
in the style of ``tiny_assets.py`` (whose chart rows and ChartQA dataset are reused as training
data; this file writes no dataset of its own):

* ``build_tokenizer()``: a byte-fallback BPE tokenizer trained with the ``tokenizers`` library,
  wrapped as a ``LlamaTokenizerFast`` laid out like Mistral v0.2's SentencePiece tokenizer in its
  "legacy" fast form: ``<unk>``=0, ``<s>``=1, ``</s>``=2, the 256 byte tokens ``<0x00>``..``<0xFF>``
  at 3..258 (so "\\n" is ``<0x0A>``=13, as in Mistral), the trained pieces, then ``<image>`` and
  ``<pad>`` last (32000 and 32001 in the real one). ``[INST]``/``[/INST]`` are plain text, cut into
  ordinary pieces, as in Mistral v0.2. The tokenizer itself adds ``<s>`` (``add_bos_token=True``);
  the chat template does not write it.
* ``build_processor(tokenizer)``: a ``LlavaNextProcessor`` around a ``LlavaNextImageProcessor`` that
  tiles images "any resolution" style in 32x32 crops, with the real model's grid pinpoints scaled
  from 336 to 32, and the real chat template.
* ``build_model(tokenizer)``: a randomly initialised ``LlavaNextForConditionalGeneration`` (tiny CLIP
  vision tower, tiny Mistral language model), about 210 thousand parameters.
* ``write_assets(output_dir)``: saves model and processor to ``output_dir/llava_next`` so that
  ``AutoProcessor`` and ``AutoModelForImageTextToText`` load them offline.

How text round-trips (the real tokenizer behaves the same way). The normalizer prepends "▁" and
turns spaces into "▁"; the decoder turns "▁" back into spaces and strips one leading space from
the whole decoded string. For text ``t`` that contains no special token:

* ``decode(tok(t, add_special_tokens=False).input_ids) == t`` exactly;
* ``decode(tok(t).input_ids, skip_special_tokens=True) == t`` exactly;
* ``decode(tok(t).input_ids) == "<s> " + t`` (the strip does not reach past ``<s>``).

Text around special tokens gets the same "▁" prepended to every stretch that follows a special
token (``<image>``, ``</s>``, ...), so ``"<image>\\nQ"`` encodes as ``<image>``, "▁", ``<0x0A>``, ...
(the real model's ids 32000, 28705, 13) and decodes as ``"<image> \\nQ"``: one extra space after
each special token that is followed by text. Any text (emoji, accents) survives through the byte
fallback; nothing becomes ``<unk>``.

Command line::

    python tests/tiny_llava_next.py --output_dir DIR [--seed 0]
"""

import os

import tiny_assets

# The processor's chat template, exactly as llava-hf/llava-v1.6-mistral-7b-hf ships it
# (chat_template.json). It is data, not code. Note what it does and does not do: no bos_token (the
# tokenizer adds <s>), no add_generation_prompt branch (a prompt simply ends in " [/INST]"), images
# first then texts within a user turn, a system turn as <<SYS>> ... <</SYS>>, and every assistant turn
# as " " + text + "</s> " with a trailing space. Content must be a list of {"type": ...} items:
# the template indexes message['content'][0]['text'] and filters content items by 'type'.
LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}"
    "{% endfor %}"
    "{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

# Mistral's SentencePiece special tokens with their real ids (unk 0, bos 1, eos 2), which code in
# the wild hard-codes; then the image and padding tokens llava-hf appended after the vocabulary.
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
SPECIAL_TOKENS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]

# SentencePiece's visible space.
SPIECE_SPACE = tiny_assets.SPIECE_SPACE

# Size of the tiny world. Each tile (crop) is IMAGE_SIZE x IMAGE_SIZE pixels, seen by the CLIP
# tower in PATCH_SIZE patches: (32 / 8) ** 2 = 16 patch features per tile, plus CLS, which the
# "default" feature strategy drops. The real model: 336-pixel tiles, 14-pixel patches, 576.
IMAGE_SIZE = 32
PATCH_SIZE = 8
REAL_IMAGE_SIZE = 336
# llava-v1.6-mistral-7b-hf's image_grid_pinpoints, (height, width) in pixels, scaled to IMAGE_SIZE:
# [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] -> multiples of 32.
IMAGE_GRID_PINPOINTS = [
    [h * IMAGE_SIZE // REAL_IMAGE_SIZE, w * IMAGE_SIZE // REAL_IMAGE_SIZE]
    for h, w in [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
]
# OpenAI CLIP's normalisation, as the real image processor uses.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _training_corpus():
    """Return tiny_assets' sentences plus the Mistral/LLaVA prompt markup, as plain text.

    [INST] and [/INST] are ordinary text in Mistral v0.2, so BPE sees them; the special tokens
    (<s>, </s>, <image>) never need pieces of their own.
    """
    lines = list(tiny_assets.training_corpus())
    lines += [
        "[INST] What is shown in this image? [/INST] A bar chart.",
        "[INST] How many bars are there? [/INST] 3",
        "[INST] Which bar is the tallest? [/INST] B",
        "<<SYS>>\nYou are a helpful assistant that reads charts.\n<</SYS>>\n\n",
        " [/INST] [INST] ",
    ]
    return lines


def build_tokenizer():
    """Build a tiny Mistral-v0.2-like fast tokenizer (``LlamaTokenizerFast``) offline.

    Layout of the ids: <unk> 0, <s> 1, </s> 2, the byte tokens 3..258, the trained pieces, then
    ``<image>`` and ``<pad>`` (the real ones are 32000 and 32001, right after the 32000-piece
    vocabulary). Padding is on the left, as llava-hf ships it.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import LlamaTokenizerFast

    # Pieces follow Mistral's layout: a "▁" in front of the text, and a newline always the byte token <0x0A>.
    pieces, merges = tiny_assets.train_bpe(_training_corpus(), prepend_space=True, newline_pieces=False)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trailing = [IMAGE_TOKEN, PAD_TOKEN]
    reserved = set(SPECIAL_TOKENS + byte_tokens + trailing)
    ordered = SPECIAL_TOKENS + byte_tokens + [p for p in pieces if p not in reserved] + trailing
    vocab = {tok: idx for idx, tok in enumerate(ordered)}

    # byte_fallback: a character with no piece is spelled as its UTF-8 bytes instead of <unk>, so
    # any text round-trips; fuse_unk as in Mistral.
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    # Mistral's tokenizer.json (the "legacy" Llama layout): prepend "▁", spaces become "▁", no
    # pre-tokenizer; the decoder undoes it and strips the one leading space the prepend added.
    core.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)])
    core.pre_tokenizer = None
    core.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    # Added special tokens, never cut into pieces; normalized=False keeps them out of the "▁" rules.
    core.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS + trailing])

    # LlamaTokenizerFast installs the post-processor itself: "<s> $A" (add_bos_token=True,
    # add_eos_token=False), the real tokenizer's behaviour. legacy=True as Mistral ships it.
    return LlamaTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        add_bos_token=True,
        add_eos_token=False,
        legacy=True,
        clean_up_tokenization_spaces=False,
        spaces_between_special_tokens=False,
        chat_template=LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE,
        padding_side="left",
    )


def build_image_processor():
    """Return a ``LlavaNextImageProcessor`` with the real settings at the tiny tile size.

    Bicubic resize to a shortest edge of 32, centre crop 32x32, rescale 1/255, CLIP mean/std, RGB,
    padding of the tile dimension so images with fewer tiles batch with larger ones.
    """
    from transformers import LlavaNextImageProcessor
    from transformers.image_utils import PILImageResampling

    return LlavaNextImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        image_grid_pinpoints=[list(p) for p in IMAGE_GRID_PINPOINTS],
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_pad=True,
        do_convert_rgb=True,
        # A leftover key of the real preprocessor_config.json; stored, never read.
        aspect_ratio_setting="anyres",
    )


def build_processor(tokenizer):
    """Return a ``LlavaNextProcessor`` whose ``<image>`` expands to the model's feature count.

    patch_size and vision_feature_select_strategy must match the model: the processor counts
    (base tile patches + 1 CLS) + unpadded grid patches + one newline per grid row, minus the CLS
    again under "default".
    """
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_config(tokenizer):
    """Return a tiny ``LlavaNextConfig`` (CLIP vision tower, Mistral text model) wired to ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    text_config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-5,
        # Mistral 7B v0.2 dropped the sliding window.
        sliding_window=None,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    return LlavaNextConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=tokenizer.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        # The penultimate CLIP layer, as in the real model (of 2 layers here: the first).
        vision_feature_layer=-2,
        image_grid_pinpoints=[list(p) for p in IMAGE_GRID_PINPOINTS],
        tie_word_embeddings=False,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_generation_config(tokenizer):
    """Return a greedy ``GenerationConfig`` that stops on ``</s>`` and pads with ``<pad>``."""
    return tiny_assets.greedy_generation_config(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


def build_model(tokenizer, seed=0):
    """Return a tiny randomly initialised ``LlavaNextForConditionalGeneration`` (float32, eval mode)."""
    from transformers import LlavaNextForConditionalGeneration

    return tiny_assets.random_model(
        LlavaNextForConditionalGeneration, build_config(tokenizer), build_generation_config(tokenizer), seed
    )


def write_assets(output_dir, seed=0):
    """Write ``output_dir/llava_next`` (model as safetensors + processor). Returns {"model": path}.

    Training data: tiny_assets' ChartQA stand-in (``tiny_assets.write_assets`` / ``build_chartqa``).
    """
    tokenizer = build_tokenizer()
    model_dir = os.path.join(output_dir, "llava_next")
    return {"model": tiny_assets.save_model_and_processor(build_model(tokenizer, seed=seed), build_processor(tokenizer), model_dir)}


def main(argv=None):
    """Command line entry point: write the assets and print the model path."""
    tiny_assets.run_builder_cli(__doc__, write_assets, argv)


if __name__ == "__main__":
    main()
