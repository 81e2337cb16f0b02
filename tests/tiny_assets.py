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
"""Tiny, offline stand-ins for google/gemma-3-*-it and the ChartQA dataset, and the builder parts
that the other families' stand-ins (tiny_qwen2_5_vl, tiny_llava_next) share.

Everything here is built on the spot, without a model hub or internet, in a few seconds on a
CPU:

* ``build_tokenizer()``: a byte-fallback BPE tokenizer trained with the ``tokenizers`` library,
  wrapped as a ``GemmaTokenizerFast`` with Gemma's special tokens (``<pad>``=0, ``<eos>``=1,
  ``<bos>``=2, ``<unk>``=3, the turn and image markers), Gemma's space handling ("▁"), a ``<bos>``
  added by the tokenizer itself, and Gemma 3's real chat template.
* ``build_processor(tokenizer)``: a ``Gemma3Processor`` for 32x32 images that become 4
  ``<image_soft_token>`` each.
* ``build_model(tokenizer)``: a randomly initialised ``Gemma3ForConditionalGeneration`` of about a
  quarter million parameters, whose multimodal projector is random too (the library zeroes it), so that it sees.
* ``make_chart_rows(n, seed)``: bar charts drawn with PIL, with questions whose answers can be read
  off the image, in ChartQA's schema; ``chart_messages(row)`` puts one in the chat format.
* ``write_assets(output_dir)``: saves all of it so that ``AutoProcessor``,
  ``AutoModelForImageTextToText`` and ``datasets.load_from_disk`` load it.

Shared by the three families' builders: ``training_corpus``, ``train_bpe``, ``greedy_generation_config``,
``random_model`` (with ``redraw_zeroed_weights``), ``save_model_and_processor`` and ``run_builder_cli``.

Command line::

    python tests/tiny_assets.py --output_dir DIR [--n_train 64 --n_val 16 --n_test 16]
"""

import argparse
import os
import random
import string

# Gemma 3's chat template, exactly as google/gemma-3-4b-it ships it (chat_template.json and
# tokenizer_config.json). It is data, not code: the fine-tuning script must see the very prompt
# layout of the real model (system text folded into the first user turn, "assistant" renamed
# "model", `trim` on every text, one <start_of_image> per image item).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# Gemma's special tokens. The first four have Gemma's real ids (pad 0, eos 1, bos 2, unk 3), which
# code in the wild hard-codes; <mask> is 4 as in Gemma. The turn and image markers simply follow
# (the real ids are 105/106 and 255999/256000); nothing should depend on those. <image_soft_token>
# is the last id of the tokenizer, as in the real one (262144).
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
EXTRA_SPECIAL_TOKENS = {"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_TOKEN}

# SentencePiece's visible space: Gemma stores " " as "▁" inside its tokens.
SPIECE_SPACE = "\u2581"

# Size of the tiny world. The vision tower sees IMAGE_SIZE x IMAGE_SIZE pixels in PATCH_SIZE
# patches (4 x 4 here); the projector average-pools them to MM_TOKENS_PER_IMAGE soft tokens
# (2 x 2), which needs patches-per-side divisible by sqrt(MM_TOKENS_PER_IMAGE).
BPE_VOCAB_SIZE = 640
IMAGE_SIZE = 32
PATCH_SIZE = 8
MM_TOKENS_PER_IMAGE = 4
# Shorter than a prompt with an image (about 30 tokens), so sliding-window attention really masks.
SLIDING_WINDOW = 16

# Bar charts: size of the rendered PNG (width, height), value range, colours by name.
CHART_SIZE = (96, 64)
CHART_MAX_VALUE = 9
BAR_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "orange": (245, 150, 20),
    "purple": (140, 60, 180),
}


def training_corpus():
    """Return sentences that cover what the tokenizer will see, so BPE learns useful merges.

    Chat markup, chart questions and answers, plain English, digits and punctuation; any other
    character still round-trips through the byte fallback.
    """
    words = (
        "the a an of to in is are was were be bar bars chart value values how many which what "
        "tallest shortest highest lowest taller shorter than sum total difference between colour "
        "color label labels answer question image picture please look at this and or not yes no "
        "there here one two three four five six seven eight nine ten you model user system "
        "assistant helpful short only with word number plot graph axis data shows"
    ).split()
    rng = random.Random(1234)
    lines = [
        "How many bars are there?",
        "Which bar is the tallest?",
        "Which bar is the shortest?",
        "What is the value of bar B?",
        "What colour is bar C?",
        "Is bar A taller than bar D?",
        "Answer with a single word or number.",
        "You are a helpful assistant that reads charts.",
        # Chat markup minus the special tokens, which the final tokenizer keeps whole anyway.
        "user\nHello there\n",
        "model\nHi!\n",
        "\n\nuser\nWhat is shown?\n\n",
        "Temperatures: 21.5 °C, 70 °F; café, naïve, résumé — déjà vu.",
        "0123456789 + - * / = % ( ) [ ] { } < > , . ; : ! ? ' \" # @ & _ ~ ^ $ |",
    ]
    for _ in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))).capitalize() + ".")
    for letter in string.ascii_uppercase[:5]:
        for colour in BAR_COLOURS:
            lines.append(f"Bar {letter} is {colour}. The value of bar {letter} is {rng.randint(1, 9)}.")
    return lines


def train_bpe(corpus, vocab_size=BPE_VOCAB_SIZE, prepend_space=False, newline_pieces=True):
    """Train a throw-away SentencePiece-style BPE model and return its (pieces in id order, merges).

    Training normalises like the final tokenizers (spaces become "▁", and with ``prepend_space`` a "▁"
    is put in front, as in Llama/Mistral's "legacy" layout) and splits before each "▁", around runs of
    newlines and around every digit, so merges stay word-like and digits stay single tokens, as in
    Gemma and Mistral (split_digits). The final tokenizers have no pre-tokenizer at all. Without
    ``newline_pieces`` no piece or merge holds a "\\n", so a newline is always the byte token <0x0A>,
    as in Mistral.
    """
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    trainee = Tokenizer(models.BPE(unk_token="<unk>"))
    replace_spaces = normalizers.Replace(" ", SPIECE_SPACE)
    trainee.normalizer = (
        normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), replace_spaces]) if prepend_space else replace_spaces
    )
    trainee.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(SPIECE_SPACE, behavior="merged_with_next"),
            pre_tokenizers.Split(Regex("\n+"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=["<unk>"])
    trainee.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(trainee.to_str())["model"]
    pieces = [tok for tok, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1]) if tok != "<unk>"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    if not newline_pieces:
        pieces = [p for p in pieces if "\n" not in p]
        merges = [m for m in merges if not any("\n" in part for part in m)]
    return pieces, merges


def build_tokenizer():
    """Build a tiny Gemma-like fast tokenizer (``GemmaTokenizerFast``) offline.

    Layout of the ids: Gemma's specials (0-4), the turn and image markers, the 256 byte-fallback
    tokens ``<0x00>``..``<0xFF>``, the trained BPE pieces, then ``<image_soft_token>`` last.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import GemmaTokenizerFast

    pieces, merges = train_bpe(training_corpus())
    leading = SPECIAL_TOKENS + TURN_TOKENS + [BOI_TOKEN, EOI_TOKEN]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    reserved = set(leading + byte_tokens + [IMAGE_TOKEN])
    ordered = leading + byte_tokens + [p for p in pieces if p not in reserved] + [IMAGE_TOKEN]
    vocab = {tok: idx for idx, tok in enumerate(ordered)}

    # byte_fallback: a character with no piece is spelled as its UTF-8 bytes instead of <unk>,
    # so any text round-trips; fuse_unk as in Gemma.
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Gemma's tokenizer.json: spaces become "▁", no dummy prefix, no pre-tokenizer; the decoder
    # undoes it: "▁" -> " ", bytes -> characters, then glue the pieces.
    core.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    core.pre_tokenizer = None
    core.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # Registered as added special tokens so text like "<start_of_turn>" maps to one id and is
    # never cut into BPE pieces; normalized=False keeps their spelling out of the "▁" rule.
    core.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in leading + [IMAGE_TOKEN]])

    # GemmaTokenizerFast installs the post-processor itself: "<bos> $A" (add_bos_token=True,
    # add_eos_token=False), exactly the real tokenizer's behaviour.
    return GemmaTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        additional_special_tokens=TURN_TOKENS,
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        spaces_between_special_tokens=False,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        # Left, as transformers' Gemma 3 conversion script sets for the instruction-tuned models.
        padding_side="left",
        model_max_length=2048,
    )


def build_image_processor(size=IMAGE_SIZE):
    """Return a ``Gemma3ImageProcessor`` resizing to ``size`` (default: the tiny vision tower's input).

    Same settings as Gemma 3's (bilinear resize, rescale 1/255, mean = std = 0.5, RGB, no
    pan-and-scan); the benchmark uses Gemma 3's real 896.
    """
    from transformers import Gemma3ImageProcessor
    from transformers.image_utils import PILImageResampling

    return Gemma3ImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=PILImageResampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        do_pan_and_scan=False,
    )


def build_processor(tokenizer):
    """Return a ``Gemma3Processor`` whose images expand to ``MM_TOKENS_PER_IMAGE`` soft tokens."""
    from transformers import Gemma3Processor

    return Gemma3Processor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )


def build_config(tokenizer):
    """Return a tiny ``Gemma3Config`` wired to ``tokenizer``'s ids."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    end_of_turn_id = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=2048,
        sliding_window=SLIDING_WINDOW,
        # One local and one global layer, so both of Gemma 3's attention kinds are exercised.
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn_id],
    )
    vision_config = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        # Gemma 3's SigLIP has no pooling head; its projector pools the patches itself.
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.convert_tokens_to_ids(BOI_TOKEN),
        eoi_token_index=tokenizer.convert_tokens_to_ids(EOI_TOKEN),
        image_token_index=tokenizer.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end_of_turn_id],
    )


def build_generation_config(tokenizer):
    """Return a ``GenerationConfig`` stopping on ``<eos>`` or ``<end_of_turn>`` like Gemma 3's."""
    return greedy_generation_config(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
        pad_token_id=tokenizer.pad_token_id,
    )


def greedy_generation_config(**token_ids):
    """A ``GenerationConfig`` with these token ids; greedy instead of the real models' sampling, so tests
    that generate are deterministic."""
    from transformers import GenerationConfig

    return GenerationConfig(**token_ids, do_sample=False)


def random_model(model_class, config, generation_config, seed=0):
    """A randomly initialised ``model_class(config)`` (float32, eval mode), the same for the same seed, whose
    images reach its logits (``redraw_zeroed_weights``).

    Shared by this module and the other families' tiny builders (tiny_qwen2_5_vl, tiny_llava_next).
    """
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    redraw_zeroed_weights(model)
    model.generation_config = generation_config
    return model.eval()


def redraw_zeroed_weights(model):
    """Draw random values for every weight matrix that the library's initialisation leaves all zero; returns their
    names.

    transformers creates Gemma 3's multimodal projector as zeros and its ``_init_weights`` zeroes it again
    (4.55.4 models/gemma3/modeling_gemma3.py:688-690 and :436-438). A pretrained checkpoint overwrites it; a random
    model keeps it, so every image token's embedding is zero whatever the pixels, and the model ignores its images.
    Such a matrix is redrawn as the library draws the model's other weight matrices, normal(0, initializer_range)
    (modeling_utils.py:2934-2941), from torch's seeded generator. Zero biases and the norms' constant weights stay:
    they do not cut the image off. Qwen2.5-VL's and LLaVA-NeXT's projectors are random already.
    """
    import torch

    std = model.config.get_text_config().initializer_range
    redrawn = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(mean=0.0, std=std)
                redrawn.append(name)
    return redrawn


def save_model_and_processor(model, processor, model_dir):
    """Save both where ``AutoModelForImageTextToText`` / ``AutoProcessor`` load them offline."""
    model.save_pretrained(model_dir, safe_serialization=True)
    processor.save_pretrained(model_dir)
    return model_dir


def build_model(tokenizer, seed=0):
    """Return a tiny randomly initialised ``Gemma3ForConditionalGeneration`` (float32, eval mode)."""
    from transformers import Gemma3ForConditionalGeneration

    return random_model(Gemma3ForConditionalGeneration, build_config(tokenizer), build_generation_config(tokenizer), seed)


def _draw_chart(values, colours):
    """Render a bar chart: bars labelled A, B, ... on a white canvas with two axes."""
    from PIL import Image, ImageDraw

    width, height = CHART_SIZE
    image = Image.new("RGB", CHART_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, bottom, top = 8, height - 12, 4
    draw.line([(left, top), (left, bottom), (width - 2, bottom)], fill=(0, 0, 0), width=1)
    slot = (width - left - 4) // len(values)
    unit = (bottom - top) / CHART_MAX_VALUE
    for i, (value, colour) in enumerate(zip(values, colours)):
        x0 = left + 3 + i * slot
        x1 = x0 + max(slot - 6, 4)
        draw.rectangle([x0, bottom - round(value * unit), x1, bottom - 1], fill=BAR_COLOURS[colour])
        draw.text((x0 + (x1 - x0) // 2 - 3, bottom + 1), string.ascii_uppercase[i], fill=(0, 0, 0))
    return image


def _ask(rng, letters, values, colours):
    """Pick a question about the chart and its answer, both determined by the drawing."""
    kind = rng.choice(["count", "tallest", "shortest", "value", "colour", "compare"])
    if kind == "count":
        return "How many bars are there?", str(len(values))
    if kind == "tallest":
        return "Which bar is the tallest?", letters[values.index(max(values))]
    if kind == "shortest":
        return "Which bar is the shortest?", letters[values.index(min(values))]
    i = rng.randrange(len(values))
    if kind == "value":
        return f"What is the value of bar {letters[i]}?", str(values[i])
    if kind == "colour":
        return f"What colour is bar {letters[i]}?", colours[i]
    j = rng.choice([k for k in range(len(values)) if k != i])
    answer = "Yes" if values[i] > values[j] else "No"
    return f"Is bar {letters[i]} taller than bar {letters[j]}?", answer


def make_chart_rows(n, seed=0):
    """Return ``n`` ChartQA-style rows: {"image", "query", "label": [answer], "human_or_machine"}.

    Each chart has 2-5 bars with distinct integer values 1-9 (so "tallest" and "shortest" are
    unambiguous and comparisons never tie) and distinct colours. Deterministic for a seed.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        count = rng.randint(2, 5)
        values = rng.sample(range(1, CHART_MAX_VALUE + 1), count)
        colours = rng.sample(sorted(BAR_COLOURS), count)
        letters = list(string.ascii_uppercase[:count])
        query, answer = _ask(rng, letters, values, colours)
        rows.append(
            {
                "image": _draw_chart(values, colours),
                "query": query,
                "label": [answer],
                "human_or_machine": rng.randint(0, 1),
            }
        )
    return rows


def chart_messages(row, system=None, with_answer=True):
    """A chart row as chat messages in the multimodal format chat templates take: an optional system
    turn, the user turn (the image, then the question) and, unless ``with_answer`` is false, the answer."""
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append(
        {"role": "user", "content": [{"type": "image", "image": row["image"]}, {"type": "text", "text": row["query"]}]}
    )
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": row["label"][0]}]})
    return messages


def chartqa_features():
    """ChartQA's ``datasets.Features``: the columns of ``make_chart_rows``' rows."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "query": datasets.Value("string"),
            "label": datasets.Sequence(datasets.Value("string")),
            "human_or_machine": datasets.ClassLabel(names=["human", "machine"]),
        }
    )


def build_chartqa(n_train=64, n_val=16, n_test=16, seed=0):
    """Return a ``datasets.DatasetDict`` with ChartQA's splits (train/val/test) and features."""
    import datasets

    features = chartqa_features()
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    # A different seed per split, so the splits are different charts.
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_list(make_chart_rows(n, seed=seed * 1000 + offset), features=features)
            for offset, (split, n) in enumerate(sizes.items())
        }
    )


def write_assets(output_dir, n_train=64, n_val=16, n_test=16, seed=0):
    """Write ``output_dir/gemma3`` (model + processor), ``output_dir/chartqa`` (DatasetDict) and
    ``output_dir/chart.png`` (the first test chart, for the README's one-question example).

    Returns {"model": path, "dataset": path, "image": path}.
    """
    import datasets

    model_dir = os.path.join(output_dir, "gemma3")
    data_dir = os.path.join(output_dir, "chartqa")
    image_path = os.path.join(output_dir, "chart.png")
    os.makedirs(output_dir, exist_ok=True)

    tokenizer = build_tokenizer()
    save_model_and_processor(build_model(tokenizer, seed=seed), build_processor(tokenizer), model_dir)

    chartqa = build_chartqa(n_train, n_val, n_test, seed=seed)
    shown = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # three tiny splits: a progress bar each would be noise
    try:
        chartqa.save_to_disk(data_dir)
    finally:
        if shown:
            datasets.utils.enable_progress_bars()
    chartqa["test"][0]["image"].save(image_path)
    return {"model": model_dir, "dataset": data_dir, "image": image_path}


def run_builder_cli(doc, write_assets, argv=None, **sizes):
    """A tiny builder's command line: --output_dir, --seed and the integer options ``sizes`` (name: default),
    passed to ``write_assets`` as keywords; prints each path it returns, one a line."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="Folder to write into (created if missing).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and data (default: 0).")
    for name, default in sizes.items():
        parser.add_argument(f"--{name}", type=int, default=default, help=f"Rows in the {name[2:]} split (default: {default}).")
    for path in write_assets(**vars(parser.parse_args(argv))).values():
        print(path)


def main(argv=None):
    """Command line entry point: write the assets and print their two paths."""
    run_builder_cli(__doc__, write_assets, argv, n_train=64, n_val=16, n_test=16)


if __name__ == "__main__":
    main()
