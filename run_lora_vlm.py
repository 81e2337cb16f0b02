#!/usr/bin/env python
# Copyright 2026 The run_lora_vlm authors.
#
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
"""LoRA fine-tuning of vision-language models (Gemma 3, Qwen2.5-VL, LLaVA-NeXT) on image + chat data.

On Intel Gaudi the script trains through optimum-habana's GaudiTrainer; anywhere else (CPU, CUDA)
the very same script trains through the stock `transformers` Trainer.

Single Gaudi card, lazy mode:

    PT_HPU_LAZY_MODE=1 python run_lora_vlm.py \
        --model_name_or_path google/gemma-3-12b-it --dataset_name HuggingFaceM4/ChartQA \
        --do_train --do_eval --output_dir ./output_gemma3 --overwrite_output_dir \
        --use_habana --use_lazy_mode --gaudi_config_name Habana/gpt2 \
        --lora_rank 16 --bf16 --gradient_checkpointing --max_train_samples 128

On a CPU with the tiny offline assets from `tests/tiny_assets.py`:

    python tests/tiny_assets.py --output_dir tiny
    python run_lora_vlm.py --model_name_or_path tiny/gemma3 --dataset_name tiny/chartqa \
        --do_train --do_eval --output_dir out --overwrite_output_dir --num_train_epochs 1

A single `.json` file holding the same keys may replace all the flags.
"""

import collections
import dataclasses
import functools
import importlib.util
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
import jinja2
import numpy as np
import torch
import transformers
from PIL import Image, ImageOps
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils.versions import require_version


require_version("transformers>=4.50", "Gemma 3 and `compute_loss_func` need transformers>=4.50.")
require_version("datasets>=3.0", "To fix: pip install -r requirements.txt")
require_version("peft>=0.14", "To fix: pip install -r requirements.txt")

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Hub id or local folder of a vision-language model, e.g. google/gemma-3-12b-it."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype the weights are loaded in. 'auto' follows --bf16/--fp16 and else float32.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where downloaded models and data are cached."})
    # Filled from --attn_implementation, which GaudiTrainingArguments owns on Gaudi (AttentionArguments elsewhere).
    attn_implementation: Optional[str] = field(default=None, init=False)
    model_revision: str = field(default="main", metadata={"help": "Model branch, tag or commit to load."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the Hub."})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "Hub dataset id, or a local path: a save_to_disk folder, a JSON/JSONL/CSV/Parquet file, a "
            "folder of such files, or an image folder with metadata."
        }
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: Optional[str] = field(
        default=None,
        metadata={"help": "Split used for evaluation (default: the first of validation, val, valid, dev)."},
    )
    test_split: str = field(default="test", metadata={"help": "Split used by --do_predict."})
    validation_split_percentage: float = field(
        default=10.0,
        metadata={"help": "With --do_eval and no evaluation split, this share of train (seeded) becomes one."},
    )
    image_column: Optional[str] = field(default=None, metadata={"help": "Column holding the image(s)."})
    question_column: Optional[str] = field(default=None, metadata={"help": "Column holding the question."})
    answer_column: Optional[str] = field(
        default=None, metadata={"help": "Column holding the answer (a string or a list of strings)."}
    )
    messages_column: Optional[str] = field(
        default=None,
        metadata={"help": "Column holding a chat (role/content messages or LLaVA from/value conversations)."},
    )
    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "System message added to every row that has none of its own."}
    )
    question_template: str = field(
        default="{question}", metadata={"help": "How the question is written in the user turn; needs a {question} slot."}
    )
    caption_instruction: str = field(
        default="Describe this image.",
        metadata={"help": "User instruction for caption-only datasets (image + caption/text)."},
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Use at most this many training rows (cut before any per-row work)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Use at most this many evaluation rows (cut before any per-row work)."}
    )
    sample_selection: str = field(
        default="first",
        metadata={
            "help": "How --max_*_samples picks rows: the first N, or N at random (seeded by --seed).",
            "choices": ["first", "random"],
        },
    )
    max_seq_length: int = field(
        default=1024,
        metadata={
            "help": "Longest sequence in tokens (image tokens included). Longer rows have their last answer cut "
            "at the tail when that keeps part of it, else they are invalid ('too_long')."
        },
    )
    padding_strategy: Optional[str] = field(
        default=None,
        metadata={
            "help": "Batch length: 'longest' row of the batch, always 'max_length' (--max_seq_length), or the "
            "smallest of --length_buckets that fits ('bucket'). Default: 'bucket' in Gaudi lazy mode, where "
            "every new shape compiles a new graph, else 'longest'.",
            "choices": ["longest", "max_length", "bucket"],
        },
    )
    length_buckets: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Lengths for --padding_strategy bucket. Default: 1/4, 1/2, 3/4 and all of --max_seq_length."},
    )
    fixed_image_size: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "HEIGHT WIDTH: resize every image to this size first, so families with dynamic resolution "
            "(Qwen2.5-VL, LLaVA-NeXT) give every image the same number of tokens (static shapes on Gaudi)."
        },
    )
    image_min_pixels: Optional[int] = field(
        default=None, metadata={"help": "Qwen2.5-VL: smallest image area (pixels) after its own resizing."}
    )
    image_max_pixels: Optional[int] = field(
        default=None, metadata={"help": "Qwen2.5-VL: largest image area (pixels) after its own resizing."}
    )
    invalid_rows: str = field(
        default="error",
        metadata={
            "help": "What a bad row does: 'error' stops at the first one naming it; 'skip' drops it, counts it "
            "and lists it in skipped_rows.json.",
            "choices": ["error", "skip"],
        },
    )

    def __post_init__(self):
        if "{question}" not in self.question_template:
            raise ValueError(f"--question_template must contain a {{question}} slot, got {self.question_template!r}.")
        try:
            self.question_template.format(question="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"--question_template {self.question_template!r} has a slot other than {{question}} ({e!r}); "
                "write literal braces as {{ and }}."
            ) from e
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be between 0 and 100 (exclusive).")
        for flag in ("max_train_samples", "max_eval_samples", "max_seq_length"):
            value = getattr(self, flag)
            if value is not None and value <= 0:
                raise ValueError(f"--{flag} must be a positive integer, got {value}.")
        if self.fixed_image_size is not None and (len(self.fixed_image_size) != 2 or min(self.fixed_image_size) <= 0):
            raise ValueError(f"--fixed_image_size takes HEIGHT WIDTH (two positive numbers), got {self.fixed_image_size}.")
        if self.length_buckets is None:
            self.length_buckets = sorted({-(-self.max_seq_length * k // 4) for k in (1, 2, 3, 4)})
        self.length_buckets = sorted(self.length_buckets)
        if self.length_buckets[0] <= 0 or self.length_buckets[-1] != self.max_seq_length:
            raise ValueError(
                f"--length_buckets {self.length_buckets}: lengths must be positive and the largest must equal "
                f"--max_seq_length {self.max_seq_length}."
            )


@dataclass
class EvaluationArguments:
    generation_eval: bool = field(
        default=False,
        metadata={
            "help": "With --do_eval / --do_predict, also answer each evaluated row by greedy generation and score "
            "it: relaxed accuracy (ChartQA), exact match and ANLS. Answers go to predictions.jsonl."
        },
    )
    generation_max_new_tokens: int = field(default=32, metadata={"help": "Longest generated answer, in tokens."})
    eval_before_training: bool = field(
        default=False,
        metadata={"help": "Evaluate the untouched model before training too, and log both side by side."},
    )
    metrics_group_column: str = field(
        default="human_or_machine",
        metadata={"help": "When the dataset has this column, generation metrics are also reported per value."},
    )

    def __post_init__(self):
        if self.generation_max_new_tokens <= 0:
            raise ValueError(f"--generation_max_new_tokens must be positive, got {self.generation_max_new_tokens}.")


@dataclass
class RunArguments:
    non_finite_loss: str = field(
        default="error",
        metadata={
            "help": "A NaN/inf training loss: 'error' stops naming the step and rows; 'skip' drops that batch.",
            "choices": ["error", "skip"],
        },
    )
    dry_run_data: Optional[int] = field(
        default=None,
        metadata={
            "help": "Build this many training batches, check them (trained tokens, one <bos>, image tokens), "
            "log one decoded example, and exit without loading the model."
        },
    )
    min_free_disk_gb: float = field(
        default=1.0, metadata={"help": "Refuse to start with less free space than this in --output_dir."}
    )
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "Write a merged model (base + LoRA, safetensors), the processor and a generation config to "
            "<output_dir>/merged: after training, or on its own from --adapter_path without --do_train."
        },
    )
    adapter_path: Optional[str] = field(
        default=None, metadata={"help": "A saved LoRA adapter, for --merge_adapter or --predict_image without training."}
    )
    predict_image: Optional[str] = field(
        default=None, metadata={"help": "Answer --predict_question about this image file and exit (no dataset)."}
    )
    predict_question: Optional[str] = field(default=None, metadata={"help": "The question for --predict_image."})

    def __post_init__(self):
        if (self.predict_image is None) != (self.predict_question is None):
            raise ValueError("--predict_image and --predict_question go together; give both or neither.")


@dataclass
class LoraArguments:
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Module names to adapt (suffixes such as q_proj v_proj), or one regular expression matched "
            "against full module names. Default: every linear layer of the language model's attention and MLP."
        },
    )

    train_vision_tower: bool = field(
        default=False, metadata={"help": "Also put LoRA on the vision tower's linear layers (frozen by default)."}
    )
    train_projector: bool = field(
        default=False,
        metadata={"help": "Also train the vision-to-text projector in full (saved with the adapter; frozen by default)."},
    )

    def __post_init__(self):
        if self.lora_target_modules and self.train_vision_tower:
            raise ValueError(
                "--train_vision_tower extends the default LoRA targets; with --lora_target_modules, name the "
                "vision tower's layers there instead."
            )
        if self.lora_rank <= 0:
            raise ValueError(f"--lora_rank must be positive, got {self.lora_rank}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")


@dataclass
class AttentionArguments:
    """--attn_implementation where Habana's stack is absent; on Gaudi, GaudiTrainingArguments has the flag."""

    attn_implementation: Optional[str] = field(
        default=None,
        metadata={
            "help": "Attention kernel (default: the model's own choice). On Gaudi, gaudi_fused_sdpa uses "
            "Habana's fused scaled-dot-product attention.",
            "choices": ["eager", "sdpa", "flash_attention_2", "gaudi_fused_sdpa"],
        },
    )


@dataclass
class GaudiOnlyArguments:
    """Flags of GaudiTrainingArguments, parsed where Habana's stack is absent so they can be refused clearly."""

    use_habana: bool = field(default=False, metadata={"help": "Train on Gaudi HPUs (needs Habana's software stack)."})
    use_lazy_mode: bool = field(default=False, metadata={"help": "Gaudi lazy mode (with PT_HPU_LAZY_MODE=1)."})
    gaudi_config_name: Optional[str] = field(
        default=None, metadata={"help": "GaudiConfig hub name or local path, e.g. Habana/gpt2."}
    )
    use_hpu_graphs_for_training: bool = field(default=False, metadata={"help": "Gaudi: HPU graphs for training."})
    pipelining_fwd_bwd: bool = field(default=False, metadata={"help": "Gaudi: overlap forward and backward."})
    throughput_warmup_steps: int = field(default=0, metadata={"help": "Gaudi: steps left out of throughput."})
    adjust_throughput: bool = field(default=False, metadata={"help": "Gaudi: leave logging time out of throughput."})
    distribution_strategy: str = field(
        default="ddp", metadata={"help": "Gaudi: data-parallel strategy.", "choices": ["ddp", "fast_ddp"]}
    )
    flash_attention_recompute: bool = field(
        default=False, metadata={"help": "Gaudi: recompute fused attention in backward (saves memory)."}
    )
    flash_attention_causal_mask: bool = field(
        default=False, metadata={"help": "Gaudi: fused attention builds the causal mask itself (right padding)."}
    )
    flash_attention_fast_softmax: bool = field(default=False, metadata={"help": "Gaudi: fast softmax in fused attention."})

    def flags_set(self) -> list[str]:
        defaults = GaudiOnlyArguments()
        return [f"--{f.name}" for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(defaults, f.name)]


# ---------------------------------------------------------------------------------------------------
# Platform
# ---------------------------------------------------------------------------------------------------


def gaudi_stack_available() -> bool:
    """True when Habana's PyTorch bridge and optimum-habana are installed.

    Only looks the packages up: importing optimum.habana without Habana's stack crashes the process.
    """
    return importlib.util.find_spec("habana_frameworks") is not None and (
        importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.habana") is not None
    )


def training_arguments_class() -> type:
    if gaudi_stack_available():
        from optimum.habana import GaudiTrainingArguments

        return GaudiTrainingArguments
    return TrainingArguments


def parse_args(argv: Optional[list[str]] = None):
    """Parse flags (or one JSON file) into (model, data, lora, training) arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    json_file = os.path.abspath(argv[0]) if len(argv) == 1 and argv[0].endswith(".json") else None
    on_gaudi_stack = gaudi_stack_available()
    if not on_gaudi_stack:
        # Checked before the training arguments are built, so a Gaudi command line gets this message
        # rather than a later, vaguer one (e.g. about --bf16 on a CPU).
        refuse_gaudi_flags(argv, json_file)
    dataclass_types = [
        ModelArguments, DataArguments, LoraArguments, EvaluationArguments, RunArguments, training_arguments_class()
    ]
    if not on_gaudi_stack:
        # Listed in --help; the Gaudi-only ones are at their defaults by now.
        dataclass_types += [AttentionArguments, GaudiOnlyArguments]
    parser = HfArgumentParser(dataclass_types)
    if json_file is not None:
        parsed = parser.parse_json_file(json_file=json_file)
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args, lora_args, eval_args, run_args, training_args = parsed[:6]
    model_args.attn_implementation = getattr(parsed[6] if len(parsed) > 6 else training_args, "attn_implementation")
    if getattr(training_args, "use_habana", False):
        settle_execution_mode(training_args, lazy_flag_given=lazy_mode_flag_given(argv, json_file))
    if data_args.padding_strategy is None:
        # Gaudi lazy mode compiles a graph per input shape; a few fixed lengths keep that bounded.
        static = getattr(training_args, "use_habana", False) and training_args.use_lazy_mode
        data_args.padding_strategy = "bucket" if static else "longest"
    return model_args, data_args, lora_args, eval_args, run_args, training_args


def lazy_mode_flag_given(argv: list[str], json_file: Optional[str]) -> bool:
    if json_file is not None:
        with open(json_file) as f:
            return "use_lazy_mode" in json.load(f)
    return any(arg == "--use_lazy_mode" or arg.startswith("--use_lazy_mode=") for arg in argv)


def settle_execution_mode(training_args, lazy_flag_given: bool) -> None:
    """Make --use_lazy_mode agree with PT_HPU_LAZY_MODE, which Habana's bridge reads when it is imported.

    GaudiTrainingArguments turns lazy mode on by default; without the flag, the environment decides.
    """
    env_value = os.environ.get("PT_HPU_LAZY_MODE")
    if env_value not in ("0", "1"):
        raise ValueError(
            f"PT_HPU_LAZY_MODE is {'unset' if env_value is None else repr(env_value)}: set PT_HPU_LAZY_MODE=1 "
            "(lazy mode, with --use_lazy_mode) or PT_HPU_LAZY_MODE=0 (eager mode) before the command."
        )
    lazy_env = env_value == "1"
    if not lazy_flag_given:
        training_args.use_lazy_mode = lazy_env
    elif training_args.use_lazy_mode != lazy_env:
        fix = "drop --use_lazy_mode" if training_args.use_lazy_mode else "add --use_lazy_mode"
        raise ValueError(
            f"PT_HPU_LAZY_MODE={env_value} asks for {'lazy' if lazy_env else 'eager'} mode but --use_lazy_mode is "
            f"{training_args.use_lazy_mode}: {fix}, or set PT_HPU_LAZY_MODE={int(not lazy_env)}."
        )


def refuse_gaudi_flags(argv: list[str], json_file: Optional[str]) -> None:
    gaudi_parser = HfArgumentParser([GaudiOnlyArguments, AttentionArguments], add_help=False, allow_abbrev=False)
    if json_file is not None:
        gaudi_args, attention_args = gaudi_parser.parse_json_file(json_file=json_file, allow_extra_keys=True)
    else:
        gaudi_args, attention_args, _ = gaudi_parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    gaudi_flags = gaudi_args.flags_set()
    if attention_args.attn_implementation == "gaudi_fused_sdpa":
        gaudi_flags.append("--attn_implementation gaudi_fused_sdpa")
    if gaudi_flags:
        raise ValueError(
            f"{', '.join(gaudi_flags)} need Intel Gaudi, but Habana's software stack (habana_frameworks and "
            "optimum-habana) is not installed here. On a Gaudi machine use Habana's PyTorch container and "
            "`pip install -r requirements.txt`; on CPU or CUDA drop these flags."
        )


# ---------------------------------------------------------------------------------------------------
# Model families
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """What the script needs to know about one model family: one entry of MODEL_FAMILIES per `model_type`.

    The chat template writes `image_placeholder(processor)` once per image; the processor then replaces it
    by a longer text (the image's tokens). Knowing how long lets the collator move assistant spans found in
    the rendered chat onto the processed tokens:
    - `image_token_counts(processor, processed)`: image tokens of each image in a processed batch;
    - `expanded_length(processor, count)`: characters the placeholder of an image with `count` tokens becomes.
    `image_inputs` are the processor outputs the model needs besides the text, one entry per image, except
    that `patches_per_image` (if set) says how many rows of a patch-concatenated `pixel_values` each image
    owns. LoRA targets need no entry: they are found in the module tree (the language model's linear layers).
    """

    image_placeholder: Callable[[Any], str]
    image_token_counts: Callable[[Any, dict], list]
    expanded_length: Callable[[Any, int], int]
    image_inputs: tuple = ("pixel_values",)
    patches_per_image: Optional[Callable[[dict], list]] = None
    processor_call_kwargs: dict = field(default_factory=dict)
    hpu_attention_options: bool = False  # the optimum-habana port takes use_flash_attention & co.
    # Loads the processor where AutoProcessor cannot (a video processor this script never uses needs torchvision).
    image_only_processor: Optional[Callable[..., Any]] = None
    # Last names of the vision tower and projector modules (for --train_vision_tower / --train_projector).
    vision_tower: str = "vision_tower"
    projector: str = "multi_modal_projector"
    # Processor arguments for --image_min_pixels / --image_max_pixels, where the family has a pixel budget.
    pixel_budget_kwargs: Optional[tuple] = None


def llava_next_image_token_counts(processor, processed) -> list:
    """LlavaNextProcessor's own count: any-resolution tiling depends on each image's original size."""
    height, width = np.asarray(processed["pixel_values"][0]).shape[-2:]
    default_strategy = processor.vision_feature_select_strategy == "default"
    return [
        processor._get_number_of_features(int(h), int(w), height, width) - int(default_strategy)
        for h, w in np.asarray(processed["image_sizes"])
    ]


def repeated_token_length(processor, count: int) -> int:
    return count * len(processor.image_token)


@functools.cache
def image_only_qwen2_5_vl_processor_class() -> type:
    """Qwen2.5-VL's processor without its video half (whose video processor needs torchvision).

    Text and images behave exactly as in the real class. The class is built on first use, so importing this
    script does not import the Qwen2.5-VL code.
    """
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **init_kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **init_kwargs)
            self.video_processor = None

    # Saved files name their processor class; name the real one, so AutoProcessor can load them elsewhere.
    ImageOnlyQwen2_5_VLProcessor.__name__ = Qwen2_5_VLProcessor.__name__
    return ImageOnlyQwen2_5_VLProcessor


def qwen2_5_vl_image_only_processor(path: str, **kwargs):
    return image_only_qwen2_5_vl_processor_class().from_pretrained(path, **kwargs)


MODEL_FAMILIES = {
    "gemma3": ModelFamily(
        image_placeholder=lambda processor: processor.boi_token,
        image_token_counts=lambda processor, processed: [processor.image_seq_length] * len(processed["pixel_values"]),
        expanded_length=lambda processor, count: len(processor.full_image_sequence),
        # Pan-and-scan would give each image a data-dependent number of crops and tokens.
        processor_call_kwargs={"do_pan_and_scan": False},
        hpu_attention_options=True,
    ),
    "qwen2_5_vl": ModelFamily(
        image_placeholder=lambda processor: processor.image_token,
        image_token_counts=lambda processor, processed: [
            int(np.prod(grid)) // processor.image_processor.merge_size**2 for grid in processed["image_grid_thw"]
        ],
        expanded_length=repeated_token_length,
        image_inputs=("pixel_values", "image_grid_thw"),
        patches_per_image=lambda processed: [int(np.prod(grid)) for grid in processed["image_grid_thw"]],
        image_only_processor=qwen2_5_vl_image_only_processor,
        vision_tower="visual",
        projector="merger",
        pixel_budget_kwargs=("min_pixels", "max_pixels"),
    ),
    "llava_next": ModelFamily(
        image_placeholder=lambda processor: processor.image_token,
        image_token_counts=llava_next_image_token_counts,
        expanded_length=repeated_token_length,
        image_inputs=("pixel_values", "image_sizes"),
    ),
}


def model_family(model_type: str) -> ModelFamily:
    if model_type not in MODEL_FAMILIES:
        raise ValueError(
            f"Model type '{model_type}' is not supported; supported model types: {', '.join(sorted(MODEL_FAMILIES))}."
        )
    return MODEL_FAMILIES[model_type]


# ---------------------------------------------------------------------------------------------------
# Data: loading and splits
# ---------------------------------------------------------------------------------------------------

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLIT_NAMES = ("validation", "val", "valid", "dev")
# A data file's split: "train", "test" or an EVAL_SPLIT_NAMES entry, then ".", "-" or "_" (train.jsonl, val_2.json,
# test-00000-of-00002.parquet).
SPLIT_FILE_NAME = re.compile(r"^(train|test|validation|valid|val|dev)(?=[-_.])")


def load_raw_datasets(data_args: DataArguments, cache_dir: Optional[str]) -> tuple[datasets.DatasetDict, Optional[Path]]:
    """Load every split; also return the folder that relative image paths are resolved against."""
    path = Path(data_args.dataset_name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({"train": loaded})
        return loaded, path
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"--dataset_name {path}: unsupported file type; use one of {sorted(DATA_FILE_BUILDERS)}.")
        return datasets.load_dataset(builder, data_files={"train": str(path)}, cache_dir=cache_dir), path.parent
    if path.is_dir():
        # metadata.jsonl/csv/parquet describe the images of an image folder; they are not the data itself.
        data_files = sorted(
            p for p in path.iterdir() if p.suffix.lower() in DATA_FILE_BUILDERS and p.stem != "metadata"
        )
        if data_files:
            return load_split_files(data_files, cache_dir), path
        return datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir), path
    return datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir), None


def load_split_files(data_files: list[Path], cache_dir: Optional[str]) -> datasets.DatasetDict:
    """Files named after a split (train.jsonl, val.jsonl, test-00000-of-00001.jsonl, ...) become that split;
    anything else is train."""
    builders = {DATA_FILE_BUILDERS[p.suffix.lower()] for p in data_files}
    if len(builders) > 1:
        raise ValueError(f"Mixed data file types in one folder: {[p.name for p in data_files]}; keep one type.")
    splits = collections.defaultdict(list)
    for data_file in data_files:
        # The split name may be followed by a shard suffix, as in train-00000-of-00004.parquet.
        named = SPLIT_FILE_NAME.match(data_file.name)
        splits[named.group(1) if named else "train"].append(str(data_file))
    return datasets.load_dataset(builders.pop(), data_files=dict(splits), cache_dir=cache_dir)


# Every list feature an image column may use; List and LargeList do not exist in every datasets release.
LIST_FEATURES = tuple(getattr(datasets, name) for name in ("Sequence", "List", "LargeList") if hasattr(datasets, name))


def undecoded(feature):
    """The same feature with image decoding switched off, so that bad images fail per row, not per batch."""
    if isinstance(feature, datasets.Image):
        return dataclasses.replace(feature, decode=False)
    if isinstance(feature, LIST_FEATURES) and isinstance(feature.feature, datasets.Image):
        # replace() keeps the list's own settings, such as a fixed length.
        return dataclasses.replace(feature, feature=dataclasses.replace(feature.feature, decode=False))
    return feature


def without_image_decoding(dataset: datasets.Dataset) -> datasets.Dataset:
    """The split with decoding switched off on its image columns (see `undecoded`).

    Column by column: on an Image column cast_column only swaps the feature, whereas Dataset.cast copies every
    row of every column into a cache file beside the data, a full copy of a large dataset at start-up.
    """
    for column, feature in dataset.features.items():
        if undecoded(feature) != feature:
            dataset = dataset.cast_column(column, undecoded(feature))
    return dataset


class IndexedRows(torch.utils.data.Dataset):
    """One split, read row by row on demand; each item carries the split name and its row index in that split."""

    def __init__(self, dataset: datasets.Dataset, split: str, row_indices: np.ndarray):
        self.dataset = dataset
        self.split = split
        self.row_indices = row_indices

    def __len__(self) -> int:
        return len(self.row_indices)

    def __getitem__(self, position: int) -> dict:
        row_index = int(self.row_indices[position])
        return {"row": self.dataset[row_index], "split": self.split, "row_index": row_index}


def cut_rows(row_indices: np.ndarray, limit: Optional[int], selection: str, seed: int) -> np.ndarray:
    if limit is None or limit >= len(row_indices):
        return row_indices
    if selection == "random":
        return np.sort(np.random.default_rng(seed).choice(row_indices, size=limit, replace=False))
    return row_indices[:limit]


def pick_eval_split(raw: datasets.DatasetDict, data_args: DataArguments) -> Optional[str]:
    if data_args.eval_split is not None:
        if data_args.eval_split not in raw:
            raise ValueError(
                f"--eval_split {data_args.eval_split}: dataset '{data_args.dataset_name}' has splits {list(raw)}."
            )
        return data_args.eval_split
    return next((name for name in EVAL_SPLIT_NAMES if name in raw), None)


def prepare_splits(raw: datasets.DatasetDict, data_args: DataArguments, training_args) -> dict[str, IndexedRows]:
    """Choose train/eval/test rows by index only; no row is read here, so start-up does not grow with size."""
    needed = {"train": training_args.do_train, "eval": training_args.do_eval, "test": training_args.do_predict}
    if (needed["train"] or needed["eval"]) and data_args.train_split not in raw and pick_eval_split(raw, data_args) is None:
        raise ValueError(
            f"Dataset '{data_args.dataset_name}' has no '{data_args.train_split}' split (splits: {list(raw)}); "
            "set --train_split."
        )
    for name in raw:
        raw[name] = without_image_decoding(raw[name])
    splits = {}
    eval_name = pick_eval_split(raw, data_args)
    train_rows = np.arange(len(raw[data_args.train_split])) if data_args.train_split in raw else None
    eval_rows = np.arange(len(raw[eval_name])) if eval_name else None
    if needed["eval"] and eval_name is None:
        eval_name = data_args.train_split
        train_rows, eval_rows = carve_validation(len(raw[eval_name]), data_args.validation_split_percentage, training_args.seed)
        logger.info(
            f"No evaluation split in {list(raw)}: {len(eval_rows)} of {len(raw[eval_name])} '{eval_name}' rows "
            f"(seed {training_args.seed}) are held out for evaluation."
        )
    seed = training_args.seed
    if needed["train"]:
        rows = cut_rows(train_rows, data_args.max_train_samples, data_args.sample_selection, seed)
        splits["train"] = IndexedRows(raw[data_args.train_split], data_args.train_split, rows)
    if needed["eval"]:
        rows = cut_rows(eval_rows, data_args.max_eval_samples, data_args.sample_selection, seed)
        splits["eval"] = IndexedRows(raw[eval_name], eval_name, rows)
    if needed["test"]:
        if data_args.test_split not in raw:
            raise ValueError(f"--do_predict needs a '{data_args.test_split}' split; found {list(raw)}. Set --test_split.")
        rows = cut_rows(np.arange(len(raw[data_args.test_split])), data_args.max_eval_samples, data_args.sample_selection, seed)
        splits["test"] = IndexedRows(raw[data_args.test_split], data_args.test_split, rows)
    return splits


def carve_validation(num_rows: int, percentage: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, rank-independent split of train into (train rows, held-out rows)."""
    held_out = max(1, int(round(num_rows * percentage / 100)))
    if held_out >= num_rows:
        raise ValueError(f"Cannot hold out {held_out} of {num_rows} rows for evaluation; lower --validation_split_percentage.")
    permutation = np.random.default_rng(seed).permutation(num_rows)
    return np.sort(permutation[held_out:]), np.sort(permutation[:held_out])


# ---------------------------------------------------------------------------------------------------
# Data: schemas and the canonical chat form
# ---------------------------------------------------------------------------------------------------


class InvalidRowError(ValueError):
    """A row that cannot become a training example; `reason` is a short stable code used in reports."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DatasetSchema:
    kind: str  # "question_answer", "caption" or "conversation"
    image_column: str
    text_column: Optional[str] = None  # the question, or None for captions and conversations
    target_column: Optional[str] = None  # the answer, the caption, or the conversation


IMAGE_COLUMNS = ("image", "images")
QUESTION_COLUMNS = ("query", "question")
ANSWER_COLUMNS = ("label", "answer", "answers")
CONVERSATION_COLUMNS = ("messages", "conversations")
CAPTION_COLUMNS = ("caption", "text")


def detect_schema(columns: list[str], data_args: DataArguments) -> DatasetSchema:
    """Work out the dataset's layout from its column names; explicit column flags win over detection."""
    found = f"Dataset '{data_args.dataset_name}' has columns {columns}"

    def pick(flag: str, candidates: tuple) -> Optional[str]:
        explicit = getattr(data_args, flag)
        if explicit is not None:
            if explicit not in columns:
                raise ValueError(f"--{flag} {explicit}: no such column. {found}.")
            return explicit
        return next((c for c in candidates if c in columns), None)

    image_column = pick("image_column", IMAGE_COLUMNS)
    if image_column is None:
        raise ValueError(f"{found} but none holds images (looked for {list(IMAGE_COLUMNS)}). Set --image_column.")
    conversation_column = pick("messages_column", CONVERSATION_COLUMNS)
    question_column = pick("question_column", QUESTION_COLUMNS)
    answer_column = pick("answer_column", ANSWER_COLUMNS)
    if conversation_column is not None and data_args.question_column is None and data_args.answer_column is None:
        return DatasetSchema("conversation", image_column, target_column=conversation_column)
    if question_column is not None and answer_column is not None:
        return DatasetSchema("question_answer", image_column, question_column, answer_column)
    caption_column = answer_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    if question_column is None and caption_column is not None:
        return DatasetSchema("caption", image_column, target_column=caption_column)
    missing = "--answer_column" if question_column is not None else "--question_column and --answer_column"
    raise ValueError(
        f"{found}: cannot tell the question and answer apart (looked for questions in {list(QUESTION_COLUMNS)}, "
        f"answers in {list(ANSWER_COLUMNS)}, chats in {list(CONVERSATION_COLUMNS)}). Set {missing}, "
        "or --messages_column for chat data."
    )


def choose_answer(value: Any) -> tuple[str, list[str]]:
    """Return (training target, all gold answers): the most frequent answer, ties going to the first one."""
    if isinstance(value, dict) and isinstance(value.get("answer"), (list, tuple)):
        # A Sequence of {"answer", ...} structs (VQAv2 on the Hub) is read back as a dict of lists.
        value = value["answer"]
    if isinstance(value, str):
        answers = [value]
    elif isinstance(value, (list, tuple)):
        # .get: a dict without "answer" is a bad row (non_string_answer below), not a crash.
        answers = [a.get("answer") if isinstance(a, dict) else a for a in value]
    else:
        raise InvalidRowError("non_string_answer", f"answer is {type(value).__name__}, expected text")
    if not all(isinstance(a, str) for a in answers):
        raise InvalidRowError("non_string_answer", f"answers must be text, got {answers!r}")
    answers = [a.strip() for a in answers if a.strip()]
    if not answers:
        raise InvalidRowError("empty_answer", "the answer is empty")
    return collections.Counter(answers).most_common(1)[0][0], answers


def as_image_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def user_turn(num_images: int, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * num_images + [text_part(text)]}


ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def conversation_turn(message: Any, image_placeholder: str) -> dict:
    """One chat message in canonical form; `<image>` placeholders in string content become image parts."""
    if not isinstance(message, dict):
        raise InvalidRowError("bad_conversation", f"message {message!r} is not a dict")
    role = ROLE_NAMES.get(message.get("role", message.get("from")))
    if role is None:
        raise InvalidRowError("bad_conversation", f"unknown role in {message!r}; expected one of {sorted(ROLE_NAMES)}")
    content = message.get("content", message.get("value"))
    if isinstance(content, str):
        parts = []
        for index, piece in enumerate(content.split(image_placeholder)):
            if index:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append(text_part(piece.strip()))
    elif isinstance(content, list) and all(isinstance(part, dict) for part in content):
        # Arrow gives every part every key of the column, so a part's "text" may be None: that is no text.
        parts = [
            {"type": "image"} if part.get("type") == "image" else text_part(str(part.get("text") or "").strip())
            for part in content
        ]
    else:
        raise InvalidRowError(
            "bad_conversation", f"{role} message content must be text or a list of part dicts, got {content!r:.100}"
        )
    return {"role": role, "content": parts}


def normalize_row(row: dict, schema: DatasetSchema, data_args: DataArguments) -> dict:
    """Turn one row of any supported schema into {"images", "messages", "answers"} (images still undecoded)."""
    images = as_image_list(row.get(schema.image_column))
    if schema.kind == "conversation":
        raw_messages = row.get(schema.target_column)
        if not isinstance(raw_messages, list) or not raw_messages:
            raise InvalidRowError("bad_conversation", f"column '{schema.target_column}' holds no messages")
        messages = [conversation_turn(m, "<image>") for m in raw_messages]
        check_conversation(messages, len(images))
        answers = [part["text"] for m in messages if m["role"] == "assistant" for part in m["content"]]
    else:
        if not images:
            raise InvalidRowError("image_missing", f"column '{schema.image_column}' is empty")
        if schema.kind == "caption":
            question = data_args.caption_instruction
        else:
            question = row.get(schema.text_column)
            if not isinstance(question, str) or not question.strip():
                raise InvalidRowError("empty_question", f"column '{schema.text_column}' is empty")
            question = data_args.question_template.format(question=question.strip())
        target, answers = choose_answer(row.get(schema.target_column))
        messages = [user_turn(len(images), question), {"role": "assistant", "content": [text_part(target)]}]
    if data_args.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [text_part(data_args.system_prompt)]})
    return {"images": images, "messages": messages, "answers": answers}


def check_conversation(messages: list[dict], num_images: int) -> None:
    placeholders = sum(part["type"] == "image" for m in messages for part in m["content"])
    if placeholders != num_images:
        raise InvalidRowError("image_count_mismatch", f"{placeholders} image placeholders but {num_images} images")
    assistant_turns = [m["content"] for m in messages if m["role"] == "assistant"]
    if not assistant_turns:
        raise InvalidRowError("no_assistant_turn", "the conversation has no assistant message")
    # Checked per turn: an empty turn next to a good one would otherwise train an empty answer.
    if any(not parts or any(p["type"] != "text" or not p["text"] for p in parts) for parts in assistant_turns):
        raise InvalidRowError("empty_answer", "an assistant message is empty or holds an image")


# ---------------------------------------------------------------------------------------------------
# Data: images
# ---------------------------------------------------------------------------------------------------


def open_image(value: Any, base_dir: Optional[Path]) -> Image.Image:
    """Decode a PIL image, bytes, {"bytes", "path"} dict or file path (relative to the dataset) as upright RGB."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str) and value:
            path = Path(value)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise InvalidRowError("image_missing", f"image file {str(path)!r} does not exist")
            image = Image.open(path)
        else:
            raise InvalidRowError("image_missing", f"no image in the row (got {type(value).__name__})")
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    # DecompressionBombError (an image past Pillow's pixel limit) is no OSError; without it here one giant image
    # would end the run even with --invalid_rows skip.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, InvalidRowError):
            raise
        raise InvalidRowError("image_unreadable", f"cannot decode image: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any PIL mode: transparency composited on white, 16/32-bit grey scaled down rather than clipped."""
    # Transparency also hides in a palette with alpha and in a PNG colour key ("transparency" in info, which
    # L and even RGB images may carry); a plain convert("RGB") would show what is under it, often black.
    transparent = (
        image.mode in ("RGBA", "RGBa", "LA", "La", "PA")
        or "transparency" in image.info
        or (image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA")
    )
    if image.mode == "RGB" and not transparent:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        grey = np.clip(pixels / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if transparent:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------
# Data: skipped-row bookkeeping
# ---------------------------------------------------------------------------------------------------


class SkippedRows:
    """Counts invalid (skipped) and truncated rows.

    Each process (dataloader workers and ranks included) appends to its own JSON-lines file under
    `<output_dir>/skipped_rows.parts`; `write_report` merges them into `skipped_rows.json`.
    """

    def __init__(self, output_dir: Optional[str]):
        self.parts_dir = Path(output_dir, "skipped_rows.parts") if output_dir else None

    def record(self, action: str, split: str, row_index: int, reason: str, detail: str) -> None:
        entry = {"action": action, "split": split, "row_index": row_index, "reason": reason, "detail": detail}
        if self.parts_dir is not None:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            with open(self.parts_dir / f"pid{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def clear(self) -> None:
        if self.parts_dir is not None and self.parts_dir.is_dir():
            for part in self.parts_dir.glob("*.jsonl"):
                part.unlink()

    def entries(self) -> list[dict]:
        if self.parts_dir is None or not self.parts_dir.is_dir():
            return []
        unique = {}
        for part in sorted(self.parts_dir.glob("*.jsonl")):
            for line in part.read_text().splitlines():
                entry = json.loads(line)
                unique[(entry["action"], entry["split"], entry["row_index"])] = entry
        return sorted(unique.values(), key=lambda e: (e["action"], e["split"], e["row_index"]))

    def write_report(self, output_dir: str) -> dict:
        """Write skipped_rows.json; return {action: {reason: count}} for logging."""
        entries = self.entries()
        counts = collections.defaultdict(collections.Counter)
        for entry in entries:
            counts[entry["action"]][entry["reason"]] += 1
        report = {
            "skipped_by_reason": dict(counts["skipped"]),
            "truncated_by_reason": dict(counts["truncated"]),
            "rows": entries,
        }
        with open(Path(output_dir, "skipped_rows.json"), "w") as f:
            json.dump(report, f, indent=2)
        return {"skipped": dict(counts["skipped"]), "truncated": dict(counts["truncated"])}


# ---------------------------------------------------------------------------------------------------
# Collator: chat template rendering and assistant-only labels
# ---------------------------------------------------------------------------------------------------


def render_with_assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat and find, in characters, what each assistant turn contributes.

    The spans come from the chat template itself: turn i spans from the end of the conversation so far
    rendered with a generation prompt to the end of the conversation including turn i; trailing
    whitespace is left out so the end-of-turn token is trained but not the newline after it.
    """
    text = processor.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        # Up to the last message is the whole conversation, rendered already.
        upto = text if index + 1 == len(messages) else processor.apply_chat_template(messages[: index + 1], tokenize=False)
        upto = upto.rstrip()
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ValueError(
                "The chat template does not render conversations as growing prefixes, so assistant tokens "
                "cannot be located; this template is not supported."
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def assistant_token_labels(
    input_ids: np.ndarray, token_starts: np.ndarray, spans: list[tuple[int, int]]
) -> np.ndarray:
    """Labels that keep a token only when it starts inside an assistant span (positions in the processed text)."""
    trained = np.zeros(len(input_ids), dtype=bool)
    for start, end in spans:
        trained |= (token_starts >= start) & (token_starts < end)
    return np.where(trained, input_ids, IGNORE_INDEX)


def shift_spans_for_images(text: str, spans: list, placeholder: str, growths: list[int]) -> list[tuple[int, int]]:
    """Move spans found in the rendered text to where they sit once the processor expanded each image.

    `growths[k]` is how many characters longer the k-th image's placeholder became.
    """
    shifted = []
    for start, end in spans:
        shift = sum(growths[: text.count(placeholder, 0, start)])
        shifted.append((start + shift, end + shift))
    return shifted


@dataclass
class EncodedRow:
    input_ids: np.ndarray
    labels: np.ndarray
    token_type_ids: Optional[np.ndarray]
    image_slice: slice  # this row's images within the batch's pixel_values
    row_index: int = -1  # in its split; -1 for a stand-in row


class VisionChatCollator:
    """Turns dataset rows into model batches that train on assistant tokens only.

    Rows are normalized, their images decoded and the chat rendered here, per batch, so start-up does not
    depend on dataset size. Bad rows raise (`invalid_rows="error"`) or are counted and dropped ("skip").
    """

    def __init__(
        self,
        processor,
        family: ModelFamily,
        schema: DatasetSchema,
        data_args: DataArguments,
        image_base_dir: Optional[Path] = None,
        skipped_rows: Optional[SkippedRows] = None,
        extra_model_inputs: Optional[dict] = None,
    ):
        self.processor = processor
        self.family = family
        self.schema = schema
        self.data_args = data_args
        self.image_base_dir = image_base_dir
        self.skipped_rows = skipped_rows or SkippedRows(None)
        # Forward keyword arguments the trainer passes on with every batch (Gemma 3's HPU attention options).
        self.extra_model_inputs = extra_model_inputs or {}
        self.placeholder = family.image_placeholder(processor)
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.image_kwargs = dict(family.processor_call_kwargs)
        budget = (data_args.image_min_pixels, data_args.image_max_pixels)
        if any(value is not None for value in budget):
            if family.pixel_budget_kwargs is None:
                raise ValueError("--image_min_pixels / --image_max_pixels apply to dynamic-resolution families (qwen2_5_vl).")
            self.image_kwargs.update({k: v for k, v in zip(family.pixel_budget_kwargs, budget) if v is not None})
        self.pad_token_id = processor.tokenizer.pad_token_id

    def open_image(self, value) -> Image.Image:
        image = open_image(value, self.image_base_dir)
        if self.data_args.fixed_image_size:
            height, width = self.data_args.fixed_image_size
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        return image

    def tokenizer_adds_bos(self, rendered: str) -> bool:
        """Whether the tokenizer should add <bos>: only when the chat template did not write it already.

        Gemma's template writes it (and its tokenizer would add a second one); LLaVA-NeXT's does not.
        """
        bos = self.processor.tokenizer.bos_token
        return bool(bos) and not rendered.startswith(bos)

    def reject(self, feature: dict, error: InvalidRowError, action: str = "skipped") -> None:
        where = f"{feature['split']} row {feature['row_index']}"
        if action == "skipped" and self.data_args.invalid_rows == "error":
            raise ValueError(
                f"Invalid {where}: {error.reason}: {error.detail}. Fix the row, or pass --invalid_rows skip "
                "to drop such rows (they are listed in skipped_rows.json)."
            ) from error
        self.skipped_rows.record(action, feature["split"], feature["row_index"], error.reason, error.detail)

    def prepare(self, feature: dict) -> tuple[str, list, list]:
        """Normalize one row: (rendered text, assistant spans, decoded images)."""
        example = normalize_row(feature["row"], self.schema, self.data_args)
        images = [self.open_image(image) for image in example["images"]]
        try:
            text, spans = render_with_assistant_spans(self.processor, example["messages"])
        except jinja2.TemplateError as e:  # the template's own checks, e.g. roles that do not alternate
            raise InvalidRowError("bad_conversation", f"the chat template rejected it: {e}") from e
        return text, spans, images

    def __call__(self, features: list[dict]) -> dict:
        prepared = []
        for feature in features:
            try:
                prepared.append((feature, *self.prepare(feature)))
            except InvalidRowError as e:
                self.reject(feature, e)
        rows, processed = self.encode(prepared)
        return self.pad(rows, processed, len(features))

    def encode(self, prepared: list) -> tuple[list[EncodedRow], dict]:
        """One processor call for the batch, then per-row labels and length policy."""
        if not prepared:
            return [], {}
        images = [imgs for _, _, _, imgs in prepared]
        processed = self.processor(
            text=[text for _, text, _, _ in prepared],
            images=images if any(images) else None,
            add_special_tokens=self.tokenizer_adds_bos(prepared[0][1]),
            return_offsets_mapping=True,
            # Some processors build token_type_ids as one array, which needs equal lengths; rows are cut back
            # to their own length below and padded again by --padding_strategy.
            padding="longest",
            padding_side="right",
            **(self.image_kwargs if any(images) else {}),
        )
        counts = self.family.image_token_counts(self.processor, processed) if any(images) else []
        growths = [self.family.expanded_length(self.processor, n) - len(self.placeholder) for n in counts]
        rows, image_start = [], 0
        for index, (feature, text, spans, row_images) in enumerate(prepared):
            images_here = slice(image_start, image_start + len(row_images))
            image_start += len(row_images)
            length = int(np.sum(processed["attention_mask"][index]))
            input_ids = np.asarray(processed["input_ids"][index][:length], dtype=np.int64)
            if np.count_nonzero(input_ids == self.image_token_id) != sum(counts[images_here]):
                raise ValueError(
                    f"{feature['split']} row {feature['row_index']}: the processor produced "
                    f"{np.count_nonzero(input_ids == self.image_token_id)} image tokens, the model family table "
                    f"expects {sum(counts[images_here])}; MODEL_FAMILIES does not match this processor."
                )
            token_starts = np.asarray(processed["offset_mapping"][index][:length], dtype=np.int64).reshape(-1, 2)[:, 0]
            spans = shift_spans_for_images(text, spans, self.placeholder, growths[images_here])
            token_type_ids = processed.get("token_type_ids")
            row = EncodedRow(
                input_ids,
                assistant_token_labels(input_ids, token_starts, spans),
                None if token_type_ids is None else np.asarray(token_type_ids[index][:length], dtype=np.int64),
                images_here,
                feature["row_index"],
            )
            try:
                rows.append(self.fit_length(row, feature))
            except InvalidRowError as e:
                self.reject(feature, e)
        return rows, processed

    def fit_length(self, row: EncodedRow, feature: dict) -> EncodedRow:
        """Apply --max_seq_length: cut only the tail of the last answer, never an image or a whole answer."""
        trained_positions = np.flatnonzero(row.labels != IGNORE_INDEX)
        if len(trained_positions) == 0:
            raise InvalidRowError("no_trained_tokens", "no assistant token survived tokenization")
        limit = self.data_args.max_seq_length
        if len(row.input_ids) <= limit:
            return row
        # Answers are contiguous runs of trained tokens; the last run is the only one that may be cut.
        gaps = np.flatnonzero(np.diff(trained_positions) > 1)
        first_token_of_last_answer = int(trained_positions[gaps[-1] + 1] if len(gaps) else trained_positions[0])
        if limit <= first_token_of_last_answer:
            raise InvalidRowError(
                "too_long", f"{len(row.input_ids)} tokens; the last answer starts at token {first_token_of_last_answer}, "
                f"beyond --max_seq_length {limit}"
            )
        self.reject(feature, InvalidRowError("answer_truncated", f"{len(row.input_ids)} tokens cut to {limit}"), "truncated")
        return dataclasses.replace(
            row,
            input_ids=row.input_ids[:limit],
            labels=row.labels[:limit],
            token_type_ids=None if row.token_type_ids is None else row.token_type_ids[:limit],
        )

    def padded_length(self, longest: int) -> int:
        strategy = self.data_args.padding_strategy or "longest"
        if strategy == "max_length":
            return self.data_args.max_seq_length
        if strategy == "bucket":
            return next(length for length in self.data_args.length_buckets if length >= longest)
        return longest

    def pad(self, rows: list[EncodedRow], processed: dict, batch_size: int) -> dict:
        if not rows:
            rows = [self.untrained_row()] * batch_size
        length = self.padded_length(max(len(r.input_ids) for r in rows))
        batch = {
            "input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
            "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
        }
        has_token_types = rows[0].token_type_ids is not None
        if has_token_types:
            batch["token_type_ids"] = torch.zeros((len(rows), length), dtype=torch.long)
        kept_images = []
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            batch["input_ids"][i, :n] = torch.from_numpy(row.input_ids)
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.from_numpy(row.labels)
            if has_token_types:
                batch["token_type_ids"][i, :n] = torch.from_numpy(row.token_type_ids)
            kept_images.extend(range(row.image_slice.start, row.image_slice.stop))
        if kept_images:
            batch.update(self.image_inputs(processed, kept_images))
        # Which rows these are, for error messages; taken out before the model's forward (TrainingLossMonitor).
        batch["row_ids"] = torch.tensor([row.row_index for row in rows], dtype=torch.long)
        return {**batch, **self.extra_model_inputs}

    def image_inputs(self, processed: dict, kept: list[int]) -> dict:
        """The per-image model inputs of the rows kept (rows can be dropped after processing)."""
        inputs = {}
        for key in self.family.image_inputs:
            values = processed[key]
            if key == "pixel_values" and self.family.patches_per_image is not None:
                starts = np.concatenate([[0], np.cumsum(self.family.patches_per_image(processed))])
                values = np.asarray(values)
                inputs[key] = torch.as_tensor(np.concatenate([values[starts[j]:starts[j + 1]] for j in kept]))
            else:
                inputs[key] = torch.as_tensor(np.stack([np.asarray(values[j]) for j in kept]))
        return inputs

    def untrained_row(self) -> EncodedRow:
        """Stand-in for the rows of a batch that were all skipped: one <bos>, nothing trained, zero gradient.

        Returning no batch would crash the trainer, and on several ranks a rank that skipped its step would
        leave the others waiting in the gradient all-reduce.
        """
        with_token_types = "token_type_ids" in self.processor.model_input_names
        return EncodedRow(
            np.array([self.processor.tokenizer.bos_token_id]),
            np.array([IGNORE_INDEX]),
            np.zeros(1, dtype=np.int64) if with_token_types else None,
            slice(0, 0),
        )


def format_trained_tokens(tokenizer, input_ids, labels) -> str:
    """Decode a row with the trained stretches in [[...]] and long runs of one token (images) collapsed."""
    ids = [int(t) for t in input_ids]
    trained = [int(label) != IGNORE_INDEX for label in labels]
    pieces, start = [], 0
    while start < len(ids):
        end = start + 1
        while end < len(ids) and trained[end] == trained[start]:
            end += 1
        text = decode_collapsing_runs(tokenizer, ids[start:end])
        pieces.append(f"[[{text}]]" if trained[start] else text)
        start = end
    return "".join(pieces)


def decode_collapsing_runs(tokenizer, ids: list[int], min_run: int = 4) -> str:
    """Decode whole stretches (so word spacing survives), writing a run of >= min_run equal tokens as tok×n."""
    pieces, start = [], 0
    while start < len(ids):
        end = start
        while end < len(ids) and ids[end] == ids[start]:
            end += 1
        if end - start >= min_run:
            pieces.append(f"{tokenizer.decode([ids[start]], skip_special_tokens=False)}×{end - start}")
            start = end
            continue
        stop = start
        while stop < len(ids) and not (stop + min_run <= len(ids) and len(set(ids[stop:stop + min_run])) == 1):
            stop += 1
        pieces.append(tokenizer.decode(ids[start:stop], skip_special_tokens=False))
        start = stop
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------------
# Evaluation by generation
# ---------------------------------------------------------------------------------------------------


def end_of_turn_token_id(processor) -> Optional[int]:
    """The token that closes an assistant turn, read off the chat template (e.g. <end_of_turn>, <|im_end|>)."""
    messages = [{"role": "user", "content": [text_part("x")]}, {"role": "assistant", "content": [text_part("y")]}]
    text, [(start, end)] = render_with_assistant_spans(processor, messages)
    marker = text[start:end].split("y", 1)[1].strip()
    ids = processor.tokenizer(marker, add_special_tokens=False).input_ids if marker else []
    return ids[0] if ids else None


def stop_token_ids(model, end_of_turn: Optional[int]) -> list[int]:
    """The model's own end tokens plus the chat template's end-of-turn token: generation stops at either."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return eos + ([end_of_turn] if end_of_turn is not None and end_of_turn not in eos else [])


class GenerationEvaluator:
    """Answers evaluation rows by greedy generation and scores the answers against the gold ones.

    The prompt is built exactly as in training (same normalization, template, system prompt and question
    template), up to the last assistant turn. Rows are sharded over ranks and the records gathered.
    """

    def __init__(self, collator: VisionChatCollator, eval_args: EvaluationArguments, batch_size: int):
        self.collator = collator
        self.processor = collator.processor
        self.eval_args = eval_args
        self.batch_size = batch_size
        self.end_of_turn = end_of_turn_token_id(self.processor)

    def prompt(self, feature: dict) -> tuple[str, list, list[str], str]:
        """(prompt text, decoded images, gold answers, question shown in the report) for one row."""
        example = normalize_row(feature["row"], self.collator.schema, self.collator.data_args)
        messages = example["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        golds = example["answers"] if self.collator.schema.kind != "conversation" else [messages[last]["content"][0]["text"]]
        question = " ".join(p["text"] for p in messages[last - 1]["content"] if p["type"] == "text")
        images = [self.collator.open_image(image) for image in example["images"]]
        text = self.processor.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return text, images, golds, question

    def generate(self, model, features: list[dict]) -> list[dict]:
        prepared = []
        for feature in features:
            try:
                prepared.append((feature, *self.prompt(feature)))
            except InvalidRowError as e:
                self.collator.reject(feature, e)
        if not prepared:
            return []
        images = [p[2] for p in prepared]
        inputs = self.processor(
            text=[p[1] for p in prepared],
            images=images if any(images) else None,
            add_special_tokens=self.collator.tokenizer_adds_bos(prepared[0][1]),
            padding="longest",
            padding_side="left",  # generation continues every row from the same position
            return_tensors="pt",
            **(self.collator.image_kwargs if any(images) else {}),
        ).to(model.device)
        inputs.pop("offset_mapping", None)
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=self.eval_args.generation_max_new_tokens, do_sample=False, use_cache=True,
                eos_token_id=stop_token_ids(model, self.end_of_turn),
            )
        answers = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        group_column = self.eval_args.metrics_group_column
        records = []
        for (feature, _, _, golds, question), answer in zip(prepared, answers):
            record = {"split": feature["split"], "row_index": feature["row_index"], "question": question,
                      "gold_answers": golds, "prediction": answer.strip()}
            record.update(score_prediction(record["prediction"], golds))
            if group_column in feature["row"]:
                record[group_column] = feature["row"][group_column]
            records.append(record)
        return records

    def evaluate(self, model, rows: IndexedRows, accelerator) -> list[dict]:
        """Records for every row of `rows`, in row order, identical on every rank."""
        from accelerate.utils import gather_object
        from tqdm.auto import tqdm

        mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
        batches = [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        was_training = model.training
        model.eval()
        records = []
        for batch in tqdm(batches, desc=f"Generating answers ({rows.split})", disable=not accelerator.is_local_main_process):
            records.extend(self.generate(model, [rows[position] for position in batch]))
        model.train(was_training)
        gathered = gather_object(records) if accelerator.num_processes > 1 else records
        return sorted(gathered, key=lambda record: record["row_index"])


def evaluate_split(trainer, rows: IndexedRows, prefix: str, generator: Optional[GenerationEvaluator]) -> dict:
    """Loss and perplexity over assistant tokens, plus generation metrics when asked; logged and returned."""
    metrics = add_perplexity(trainer.evaluate(eval_dataset=rows, metric_key_prefix=prefix), prefix)
    metrics[f"{prefix}_samples"] = len(rows)
    if generator is not None:
        records = generator.evaluate(trainer.accelerator.unwrap_model(trainer.model), rows, trainer.accelerator)
        scores = aggregate_scores(records, generator.eval_args.metrics_group_column)
        metrics.update({f"{prefix}_{name}": value for name, value in scores.items()})
        trainer.log({f"{prefix}_{name}": value for name, value in scores.items()})
        if trainer.args.should_save:
            with open(Path(trainer.args.output_dir, "predictions.jsonl"), "a") as f:
                for record in records:
                    f.write(json.dumps({"evaluation": prefix, **record}, default=str) + "\n")
    return metrics


def log_before_and_after(before: dict, after: dict) -> None:
    """One line per quality metric: the untouched model's value, then the fine-tuned one's."""
    lines = []
    for name, value in before.items():
        metric = name[len("eval_before_"):]
        if metric.split("_")[0] in ("loss", "perplexity") or metric.startswith(METRIC_NAMES):
            lines.append(f"  {metric:<24} {value:>10.4f} -> {after.get('eval_' + metric, float('nan')):>10.4f}")
    logger.info("Evaluation before -> after training:\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------


def causal_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy over trained tokens, in float32, with static shapes.

    The sum is divided by the number of trained tokens in the whole gradient-accumulation window (the
    trainer's `num_items_in_batch`), so accumulating N batches of 1 gives the gradient of one batch of N.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    loss_sum = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device).clamp(min=1)
    else:
        num_items_in_batch = max(int(num_items_in_batch), 1)
    return loss_sum / num_items_in_batch


class TrainingLossMonitor(transformers.TrainerCallback):
    """The trainer's loss function, plus what it sees: batch shapes per epoch and non-finite losses.

    Shapes are counted where the loss is computed, in the training process, so dataloader workers do not
    hide them (on Gaudi lazy mode each new shape is a graph compile). A non-finite loss stops the run naming
    the step and the batch's rows, or with `non_finite_loss="skip"` contributes no gradient. The rows come
    from the batch's `row_ids`, which a forward pre-hook takes out before the model sees them.
    """

    def __init__(self, non_finite_loss: str = "error", split: str = "train"):
        self.non_finite_loss = non_finite_loss
        self.split = split
        self.shapes = collections.Counter()
        self.step = 0
        self.row_ids: Optional[torch.Tensor] = None
        self.skipped_batches = 0

    def take_row_ids(self, module, args, kwargs):
        self.row_ids = kwargs.pop("row_ids", None)
        return args, kwargs

    def loss(self, outputs, labels, num_items_in_batch=None):
        loss = causal_lm_loss(outputs, labels, num_items_in_batch)
        if not torch.is_grad_enabled():  # evaluation: neither counted nor checked here
            return loss
        self.shapes[tuple(labels.shape)] += 1
        if bool(torch.isfinite(loss)):
            return loss
        rows = [] if self.row_ids is None else [int(r) for r in self.row_ids.tolist() if r >= 0]
        where = f"training step {self.step + 1}, {self.split} rows {rows}"
        if self.non_finite_loss == "error":
            raise FloatingPointError(
                f"Non-finite loss ({loss.item()}) at {where}. Check these rows and the learning rate, or pass "
                "--non_finite_loss skip to drop such batches."
            )
        self.skipped_batches += 1
        logger.warning(f"Non-finite loss at {where}: the batch is skipped (it contributes no gradient).")
        # A zero built from the trainable weights, not from the NaN graph, so every gradient is exactly zero.
        return sum(p.sum() for p in self.trainable_parameters) * 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable_parameters = [p for p in model.parameters() if p.requires_grad]

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        shapes = ", ".join(f"{b}x{n}: {count}" for (b, n), count in sorted(self.shapes.items()))
        logger.info(f"Epoch {state.epoch:.2f}: {len(self.shapes)} distinct training batch shapes ({shapes})")
        self.shapes.clear()


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a job they asked to stop


class PreemptionHandler(transformers.TrainerCallback):
    """On SIGTERM (what schedulers send before preempting), finish the step, save a checkpoint and stop.

    On several ranks the request is agreed on after every step, so all ranks stop at the same one.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at_step: Optional[int] = None

    def install(self):
        """Handle SIGTERM from now on; returns the previous handler, for `signal.signal` to restore."""
        return signal.signal(signal.SIGTERM, self.request)

    def request(self, signum, frame) -> None:
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized() and args.world_size > 1:
            flag = torch.tensor([int(requested)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True


# ---------------------------------------------------------------------------------------------------
# Evaluation metrics
# ---------------------------------------------------------------------------------------------------

# Pure-Python answer metrics (ChartQA relaxed accuracy, exact match, ANLS): no torch, no Hub downloads.
METRIC_NAMES = ("relaxed_accuracy", "exact_match", "anls")

# An optional sign, an optional "$", digits (either plain or grouped by commas in threes) with an optional
# fraction, or a bare fraction (".5"), then an optional "%". No exponents, no "nan"/"inf".
_NUMBER_RE = re.compile(r"^([+-]?)\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)%?$")


def normalize_answer(text) -> str:
    """Canonical form of an answer for comparison.

    Lower-cases, strips the ends, collapses every run of whitespace to one space, then drops one trailing
    period ("Blue ." -> "blue", "3.5." -> "3.5"). Punctuation elsewhere and articles are kept as they are.
    `None` counts as the empty string; other non-strings go through `str` first.
    """
    if text is None:
        return ""
    text = " ".join(str(text).lower().split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def parse_number(text) -> Optional[float]:
    """The number an answer spells, or None when it is not a plain number.

    Accepts surrounding whitespace, a sign, a leading "$", thousands separators grouped in threes and a
    trailing "%" (dropped, not divided: "12%" -> 12.0): "12", "-3.5", "1,234", "$5", " 7.0 ". Anything
    else ("12 apples", "1e3", "nan", "1,23", "") gives None.
    """
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text) if math.isfinite(text) else None
    match = _NUMBER_RE.match(str(text).strip())
    if match is None:
        return None
    return float(match.group(1) + match.group(2).replace(",", ""))


def relaxed_match(prediction, gold) -> bool:
    """ChartQA's relaxed accuracy for one gold answer.

    When both answers parse as numbers (after `normalize_answer`, so "12." is 12), the prediction is correct
    when |prediction - gold| <= 5% of |gold|; a gold of 0 therefore needs exactly 0. Otherwise the
    normalized strings must be equal (case-insensitive exact match).
    """
    pred_text, gold_text = normalize_answer(prediction), normalize_answer(gold)
    pred_number, gold_number = parse_number(pred_text), parse_number(gold_text)
    if pred_number is not None and gold_number is not None:
        if gold_number == 0:
            return pred_number == 0
        return abs(pred_number - gold_number) <= 0.05 * abs(gold_number)
    return pred_text == gold_text


def exact_match(prediction, gold) -> bool:
    """Equality of the normalized answers ("Yes." matches "yes"; "12" does not match "12.0")."""
    return normalize_answer(prediction) == normalize_answer(gold)


def levenshtein_distance(a: str, b: str) -> int:
    """Fewest single-character insertions, deletions and substitutions turning `a` into `b` (one-row DP)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls_score(prediction, gold, threshold: float = 0.5) -> float:
    """Normalized Levenshtein similarity of one prediction to one gold answer, as used by ANLS.

    On the normalized strings: 1 - distance / max(len(prediction), len(gold)); two empty strings score 1.
    A score below `threshold` is set to 0, i.e. a normalized distance above 0.5 scores 0 (a distance of
    exactly 0.5 keeps its 0.5).
    """
    pred_text, gold_text = normalize_answer(prediction), normalize_answer(gold)
    longest = max(len(pred_text), len(gold_text))
    if longest == 0:
        return 1.0
    score = 1.0 - levenshtein_distance(pred_text, gold_text) / longest
    return score if score >= threshold else 0.0


def score_prediction(prediction, golds) -> dict:
    """The three metrics of one prediction, each the best over all gold answers.

    Returns {"relaxed_accuracy": 0.0|1.0, "exact_match": 0.0|1.0, "anls": float in [0, 1]}. A single gold
    string is accepted as a list of one; no gold answers score 0 everywhere.
    """
    if isinstance(golds, str) or golds is None:
        golds = [] if golds is None else [golds]
    golds = list(golds)
    return {
        "relaxed_accuracy": float(any(relaxed_match(prediction, gold) for gold in golds)),
        "exact_match": float(any(exact_match(prediction, gold) for gold in golds)),
        "anls": max((anls_score(prediction, gold) for gold in golds), default=0.0),
    }


def aggregate_scores(records: list, group_key: Optional[str] = None) -> dict:
    """Means of the metrics over records (dicts as `score_prediction` returns, plus any other keys).

    Each metric in METRIC_NAMES present in the records is averaged over the records that hold it. With
    `group_key` (e.g. ChartQA's "human_or_machine"), records holding that key are also averaged per value,
    as "<metric>_<value>" ("relaxed_accuracy_0", "anls_human"). Values are plain floats; no records -> {}.
    """
    def means(rows) -> dict:
        result = {}
        for name in METRIC_NAMES:
            values = [float(row[name]) for row in rows if row.get(name) is not None]
            if values:
                result[name] = float(sum(values) / len(values))
        return result

    records = list(records)
    if not records:
        return {}
    result = means(records)
    if group_key is not None:
        groups: dict = {}
        for row in records:
            if row.get(group_key) is not None:
                groups.setdefault(str(row[group_key]), []).append(row)
        for value in sorted(groups):
            for name, mean in means(groups[value]).items():
                result[f"{name}_{value}"] = mean
    return result


# ---------------------------------------------------------------------------------------------------
# Model and LoRA
# ---------------------------------------------------------------------------------------------------


def resolve_dtype(model_args: ModelArguments, training_args) -> torch.dtype:
    if model_args.torch_dtype != "auto":
        return getattr(torch, model_args.torch_dtype)
    if training_args.bf16:
        return torch.bfloat16
    return torch.float16 if training_args.fp16 else torch.float32


def load_model(model_args: ModelArguments, training_args, config):
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        torch_dtype=resolve_dtype(model_args, training_args),
        # Gaudi's fused attention is switched on per forward call (see hpu_model_inputs), not at load time.
        attn_implementation="eager" if model_args.attn_implementation == "gaudi_fused_sdpa" else model_args.attn_implementation,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    # The KV cache is useless in training and conflicts with gradient checkpointing.
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = False
    if training_args.gradient_checkpointing:
        # Lets gradients reach the LoRA layers through checkpointed blocks whose inputs are frozen embeddings.
        model.enable_input_require_grads()
        if training_args.gradient_checkpointing_kwargs is None:
            training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    return model


def module_named(model, last_name: str) -> tuple[str, torch.nn.Module]:
    """The outermost module whose name ends in `last_name` (e.g. "vision_tower"), with its full name."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == last_name:
            return name, module
    raise ValueError(f"The model has no module named '{last_name}'; the MODEL_FAMILIES entry does not fit it.")


def linear_layers_pattern(prefix: str, module: torch.nn.Module, exclude: Optional[str] = None) -> str:
    """A regex (without anchors) for the linear layers under `prefix`, by their last names."""
    leaf_names = sorted(
        {name.rsplit(".", 1)[-1] for name, layer in module.named_modules()
         if isinstance(layer, torch.nn.Linear) and not (exclude and name.startswith(exclude))}
    )
    if not leaf_names:
        raise ValueError(f"No linear layers under '{prefix}'; set --lora_target_modules.")
    excluded = rf"(?!{re.escape(exclude)}\.)" if exclude else ""
    return rf"{re.escape(prefix)}\.{excluded}(?:.*\.)?({'|'.join(map(re.escape, leaf_names))})"


def default_lora_targets(model, family: ModelFamily, lora_args: LoraArguments) -> str:
    """The language model's linear layers (attention and MLP), plus the vision tower's when asked."""
    language_model = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    patterns = [linear_layers_pattern(prefix, language_model)]
    if lora_args.train_vision_tower:
        tower_name, tower = module_named(model, family.vision_tower)
        # Where the projector sits inside the tower (Qwen2.5-VL's merger), it is --train_projector's business.
        inner_projector = next((n for n, _ in tower.named_modules() if n.rsplit(".", 1)[-1] == family.projector), None)
        patterns.append(linear_layers_pattern(tower_name, tower, exclude=inner_projector))
    return rf"^(?:{'|'.join(patterns)})$"


def lora_targets(model, family: ModelFamily, lora_args: LoraArguments):
    requested = lora_args.lora_target_modules
    if not requested:
        return default_lora_targets(model, family, lora_args)
    if len(requested) == 1 and re.search(r"[\^\$\*\+\?\[\]\(\)\|\\]", requested[0]):
        return requested[0]
    return list(requested)


def apply_lora(model, lora_args: LoraArguments, family: ModelFamily):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_args.lora_rank,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_targets(model, family, lora_args),
        # Trained in full and saved with the adapter.
        modules_to_save=[module_named(model, family.projector)[0]] if lora_args.train_projector else None,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"--lora_target_modules {lora_args.lora_target_modules}: {e}") from e
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(f"LoRA targets: {config.target_modules}")
    logger.info(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return model


# ---------------------------------------------------------------------------------------------------
# Trainer and run bookkeeping
# ---------------------------------------------------------------------------------------------------


def setup_logging(training_args) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, "
        f"world size: {training_args.world_size}, bf16: {training_args.bf16}"
    )


def last_complete_checkpoint(output_dir: Path) -> Optional[str]:
    """The newest checkpoint-N folder whose trainer_state.json, written last of all, is whole.

    A checkpoint being written when the process died lacks it (or holds a cut-off file) and is passed over.
    """
    steps = sorted(
        (int(match.group(1)), path)
        for path in output_dir.glob("checkpoint-*")
        if path.is_dir() and (match := re.fullmatch(r"checkpoint-(\d+)", path.name))
    )
    for step, path in reversed(steps):
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning(f"Ignoring incomplete checkpoint {path} (no readable trainer_state.json).")
            continue
        if state.get("global_step") == step:
            return str(path)
    return None


def check_free_disk(output_dir: str, min_free_gb: float) -> None:
    existing = Path(output_dir).resolve()
    while not existing.exists():
        existing = existing.parent
    free_gb = shutil.disk_usage(existing).free / 2**30
    if free_gb < min_free_gb:
        raise ValueError(
            f"Only {free_gb:.2f} GiB free under {existing}, below --min_free_disk_gb {min_free_gb}: checkpoints "
            "would fail mid-run. Free some space or choose another --output_dir."
        )


def checkpoint_to_resume(training_args) -> Optional[str]:
    """The checkpoint to resume from; refuse to train into a non-empty folder that holds none."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    if not training_args.do_train or training_args.overwrite_output_dir or not output_dir.is_dir():
        return None
    last_checkpoint = last_complete_checkpoint(output_dir)
    if last_checkpoint is None and any(p.name != "skipped_rows.parts" for p in output_dir.iterdir()):
        raise ValueError(
            f"--output_dir {output_dir} is not empty and holds no checkpoint to resume from. "
            "Pass --overwrite_output_dir to train over it, or choose another folder."
        )
    if last_checkpoint is not None:
        logger.info(f"Resuming from {last_checkpoint}; pass --overwrite_output_dir to start afresh.")
    return last_checkpoint


def prepare_training_arguments(training_args, lora_args: LoraArguments) -> None:
    """Settings the data pipeline depends on, whatever the command line says."""
    if lora_args.train_vision_tower and training_args.ddp_find_unused_parameters is None:
        # Some families read an inner vision layer (LLaVA-NeXT: the second to last), leaving the LoRA weights
        # of the layers after it without gradients, which DDP otherwise reports as an error.
        training_args.ddp_find_unused_parameters = True
    # The collator reads the raw columns; the trainer must not drop them.
    training_args.remove_unused_columns = False
    # PEFT's wrapper hides `labels` from the trainer's signature inspection.
    training_args.label_names = ["labels"]
    # Evaluation needs the loss only; gathering full-vocabulary logits would exhaust memory.
    training_args.prediction_loss_only = True


def hpu_model_inputs(training_args) -> dict:
    """Gemma 3's HPU forward options, sent with every batch; only when training on Gaudi.

    optimum-habana's Gemma 3 port takes them as forward arguments and GaudiTrainer does not pass them.
    The causal-mask variant of fused attention ignores the attention mask, which is safe here because the
    collator always pads on the right.
    """
    if not getattr(training_args, "use_habana", False):
        return {}
    return {
        "use_flash_attention": training_args.attn_implementation == "gaudi_fused_sdpa",
        "flash_attention_recompute": training_args.flash_attention_recompute,
        "flash_attention_causal_mask": training_args.flash_attention_causal_mask,
        "flash_attention_fast_softmax": training_args.flash_attention_fast_softmax,
        # The port marks lazy-mode steps unless told otherwise, even in eager mode.
        "lazy_mode": training_args.use_lazy_mode,
    }


def gaudi_trainer_class():
    from optimum.habana import GaudiTrainer

    class TokenCountingGaudiTrainer(GaudiTrainer):
        """GaudiTrainer whose trained-token count for the accumulation window works with unequal lengths.

        GaudiTrainer concatenates the window's labels to count them; when micro-batches differ in length
        (bucket or longest padding) that fails silently and the loss is then not normalized over the window.
        The stock Trainer sums per micro-batch instead.
        """

        def get_batch_samples_transformers(self, epoch_iterator, num_batches, device):
            return Trainer.get_batch_samples(self, epoch_iterator, num_batches, device)

    return TokenCountingGaudiTrainer


def build_trainer(model, training_args, model_args, run_args, processor, splits, collator):
    monitor = TrainingLossMonitor(run_args.non_finite_loss, splits["train"].split if "train" in splits else "train")
    model.register_forward_pre_hook(monitor.take_row_ids, with_kwargs=True)
    preemption = PreemptionHandler()
    common = dict(
        model=model,
        args=training_args,
        train_dataset=splits.get("train"),
        eval_dataset=splits.get("eval"),
        data_collator=collator,
        processing_class=processor,
        compute_loss_func=monitor.loss,
        callbacks=[monitor, preemption],
    )
    if not gaudi_stack_available():
        return Trainer(**common)
    from optimum.habana import GaudiConfig

    if training_args.gaudi_config_name:
        gaudi_config = GaudiConfig.from_pretrained(
            training_args.gaudi_config_name, cache_dir=model_args.cache_dir, revision=model_args.model_revision
        )
    else:
        gaudi_config = GaudiConfig()
    return gaudi_trainer_class()(gaudi_config=gaudi_config, **common)


def log_trained_sample(collator: VisionChatCollator, splits: dict) -> None:
    """Show one encoded row with its trained tokens marked, so a wrong mask is visible before training."""
    rows = splits.get("train") or splits.get("eval")
    if rows is None or len(rows) == 0:
        return
    batch = collator([rows[0]])
    marked = format_trained_tokens(collator.processor.tokenizer, batch["input_ids"][0], batch["labels"][0])
    logger.info(f"Sample {rows.split} row {rows.row_indices[0]}, trained tokens in [[...]]:\n{marked}")


def log_training_plan(training_args, num_rows: int) -> None:
    per_device = training_args.per_device_train_batch_size
    accumulation = training_args.gradient_accumulation_steps
    logger.info(
        f"Running training on {num_rows} rows: world size {training_args.world_size}, per-device batch {per_device}, "
        f"gradient accumulation {accumulation}, effective batch size {per_device * training_args.world_size * accumulation}"
    )


def add_perplexity(metrics: dict, prefix: str = "eval") -> dict:
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(loss) if loss < 700 else float("inf")
    return metrics


# ---------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------


def export_mpi_rank_environment() -> None:
    """Under mpirun, expose the rank in the variables torch.distributed and accelerate read (as torchrun does).

    Without LOCAL_RANK, accelerate does not take the multi-HPU (HCCL) path on Gaudi.
    """
    mpi_names = {
        "RANK": "OMPI_COMM_WORLD_RANK",
        "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE",
        "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK",
        "LOCAL_WORLD_SIZE": "OMPI_COMM_WORLD_LOCAL_SIZE",
    }
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" not in os.environ:
        return
    for name, mpi_name in mpi_names.items():
        if mpi_name in os.environ:
            os.environ[name] = os.environ[mpi_name]


def load_processor(model_args: ModelArguments):
    """The processor, and the family entry picked from config.model_type (never from the model's name)."""
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub_kwargs(model_args))
    family = model_family(config.model_type)
    try:
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, **hub_kwargs(model_args))
    except ImportError as e:
        if family.image_only_processor is None or "torchvision" not in str(e).lower():
            raise
        logger.warning(f"Loading the processor without its video part ({e}); images and text work as usual.")
        processor = family.image_only_processor(model_args.model_name_or_path, **hub_kwargs(model_args))
    if not processor.chat_template:
        raise ValueError(
            f"{model_args.model_name_or_path} has no chat template, which the collator needs to find the "
            "assistant's tokens; use an instruction-tuned checkpoint (e.g. google/gemma-3-12b-it)."
        )
    return config, family, processor


def hub_kwargs(model_args: ModelArguments) -> dict:
    return dict(
        cache_dir=model_args.cache_dir, revision=model_args.model_revision, trust_remote_code=model_args.trust_remote_code
    )


def dry_run_data(collator: VisionChatCollator, rows: IndexedRows, num_batches: int, batch_size: int) -> dict:
    """Build batches as training would and check them, without a model; return what was checked.

    The collator itself checks every row's image-token count against the family table; here each row must
    also have at least one trained token and exactly one <bos>.
    """
    bos = collator.processor.tokenizer.bos_token_id
    checked = collections.Counter()
    for start in range(0, min(num_batches * batch_size, len(rows)), batch_size):
        features = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        batch = collator(features)
        real = batch["row_ids"] >= 0
        for ids, labels, row_id in zip(batch["input_ids"][real], batch["labels"][real], batch["row_ids"][real]):
            where = f"{rows.split} row {int(row_id)}"
            if not (labels != IGNORE_INDEX).any():
                raise ValueError(f"Dry run: {where} has no trained token.")
            if bos is not None and int((ids == bos).sum()) != 1:
                raise ValueError(f"Dry run: {where} has {int((ids == bos).sum())} <bos> tokens, not 1.")
        kept = set(batch["row_ids"].tolist())
        checked["batches"] += 1
        checked["rows"] += int(real.sum())
        checked["images"] += sum(
            len(as_image_list(f["row"].get(collator.schema.image_column))) for f in features if f["row_index"] in kept
        )
    log_trained_sample(collator, {"train": rows})
    logger.info(f"Dry run passed: {dict(checked)}; every row has trained tokens and one <bos>.")
    return dict(checked)


def export_merged(model, processor, output_dir: Path) -> Path:
    """Fold the LoRA weights into the base model and save what a server or a pipeline loads as is."""
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    if getattr(merged.config, "text_config", None) is not None:
        merged.config.text_config.use_cache = True
    merged.generation_config.eos_token_id = stop_token_ids(merged, end_of_turn_token_id(processor))
    merged.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    logger.info(f"Merged model written to {output_dir} (end of generation: {merged.generation_config.eos_token_id})")
    return output_dir


def run_on_saved_adapter(model_args, data_args, run_args, training_args):
    """Without training: merge a saved adapter, or answer one question about one image."""
    from peft import PeftModel

    config, family, processor = load_processor(model_args)
    model = load_model(model_args, training_args, config)
    if run_args.adapter_path:
        model = PeftModel.from_pretrained(model, run_args.adapter_path)
    if run_args.merge_adapter:
        if not run_args.adapter_path:
            raise ValueError("--merge_adapter without --do_train needs --adapter_path (a saved adapter folder).")
        export_merged(model, processor, Path(training_args.output_dir, "merged"))
    if run_args.predict_image is None:
        return None
    schema = DatasetSchema("question_answer", "image", "question", "answer")
    collator = VisionChatCollator(processor, family, schema, data_args)
    generator = GenerationEvaluator(collator, EvaluationArguments(), batch_size=1)
    feature = {"row": {"image": run_args.predict_image, "question": run_args.predict_question, "answer": "unused"},
               "split": "command line", "row_index": 0}
    answer = generator.generate(model.to(training_args.device), [feature])[0]["prediction"]
    print(answer)
    return answer


def main(argv: Optional[list[str]] = None):
    """Run the pipeline; returns the trainer (its model holds the trained adapter) for callers and tests."""
    # Parse: on Gaudi this builds GaudiTrainingArguments, which must exist before the model is loaded.
    export_mpi_rank_environment()
    model_args, data_args, lora_args, eval_args, run_args, training_args = parse_args(argv)
    prepare_training_arguments(training_args, lora_args)

    # Logging, seed, and pre-flight checks of the output folder.
    setup_logging(training_args)
    set_seed(training_args.seed)
    if run_args.predict_image or (run_args.merge_adapter and not training_args.do_train):
        return run_on_saved_adapter(model_args, data_args, run_args, training_args)
    if data_args.dataset_name is None:
        raise ValueError("--dataset_name is required (a Hub dataset id or a local path).")
    resume_checkpoint = checkpoint_to_resume(training_args)
    check_free_disk(training_args.output_dir, run_args.min_free_disk_gb)

    # Data: rows are chosen by index only; images are decoded per batch by the collator.
    with training_args.main_process_first(desc="loading the dataset"):
        raw, image_base_dir = load_raw_datasets(data_args, model_args.cache_dir)
        splits = prepare_splits(raw, data_args, training_args)
    schema = detect_schema(next(iter(splits.values())).dataset.column_names, data_args)
    logger.info(f"Dataset schema: {schema}; rows: { {name: len(rows) for name, rows in splits.items()} }")

    # Processor and collator: only assistant tokens are trained.
    config, family, processor = load_processor(model_args)
    skipped_rows = SkippedRows(training_args.output_dir)
    if training_args.should_save and resume_checkpoint is None:
        skipped_rows.clear()
        Path(training_args.output_dir, "predictions.jsonl").unlink(missing_ok=True)
    collator = VisionChatCollator(
        processor, family, schema, data_args, image_base_dir, skipped_rows,
        hpu_model_inputs(training_args) if family.hpu_attention_options else {},
    )
    if run_args.dry_run_data:
        return dry_run_data(collator, splits.get("train") or next(iter(splits.values())), run_args.dry_run_data,
                            training_args.per_device_train_batch_size)
    if training_args.should_log:
        log_trained_sample(collator, splits)

    # Model, with LoRA on the language model only.
    model = apply_lora(load_model(model_args, training_args, config), lora_args, family)

    # Trainer: GaudiTrainer on Gaudi, the stock Trainer elsewhere.
    trainer = build_trainer(model, training_args, model_args, run_args, processor, splits, collator)
    generator = GenerationEvaluator(collator, eval_args, training_args.per_device_eval_batch_size) if eval_args.generation_eval else None

    # Train (stopping cleanly on SIGTERM), then save the adapter and the processor.
    before = {}
    if training_args.do_train:
        if training_args.do_eval and eval_args.eval_before_training:
            before = evaluate_split(trainer, splits["eval"], "eval_before", generator)
        log_training_plan(training_args, len(splits["train"]))
        train_and_save(trainer, resume_checkpoint, len(splits["train"]))

    # Evaluate and predict: loss over assistant tokens, perplexity and, if asked, generation metrics.
    evaluated = {}
    for stage, prefix in (("eval", "eval"), ("test", "predict")):
        if stage in splits:
            evaluated[prefix] = evaluate_split(trainer, splits[stage], prefix, generator)
            metrics = {**evaluated[prefix], **(before if prefix == "eval" else {})}
            trainer.log_metrics(prefix, metrics)
            trainer.save_metrics(prefix, metrics)
    if before:
        log_before_and_after(before, evaluated["eval"])

    # Report rows that were skipped or truncated, once every rank has recorded its own; export if asked.
    trainer.accelerator.wait_for_everyone()
    if training_args.should_save:
        report = skipped_rows.write_report(training_args.output_dir)
        if any(report.values()):
            logger.warning(f"Rows skipped or truncated, by reason: {report} (see skipped_rows.json)")
        if run_args.merge_adapter and training_args.do_train:
            export_merged(trainer.accelerator.unwrap_model(trainer.model), processor, Path(training_args.output_dir, "merged"))
    return trainer


def train_and_save(trainer, resume_checkpoint: Optional[str], num_rows: int) -> None:
    preemption = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PreemptionHandler))
    previous_handler = preemption.install()
    try:
        train_result = trainer.train(resume_from_checkpoint=resume_checkpoint)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if preemption.stopped_at_step is not None:
        logger.error(
            f"Preempted (SIGTERM): stopped after step {preemption.stopped_at_step} with a checkpoint in "
            f"{trainer.args.output_dir}. Resume with the same command."
        )
        raise SystemExit(PREEMPTED_EXIT_CODE)
    trainer.save_model()
    metrics = {**train_result.metrics, "train_samples": num_rows}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()


if __name__ == "__main__":
    main()
