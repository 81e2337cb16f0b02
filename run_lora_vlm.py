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

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
import numpy as np
import pyarrow as pa
import torch
import transformers
from accelerate.utils import gather_object
from datasets.data_files import DataFilesDict
from datasets.fingerprint import Hasher
from PIL import ExifTags, Image, ImageOps
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, HfArgumentParser, set_seed
from transformers import Trainer, TrainingArguments
from transformers.image_transforms import convert_to_rgb
from transformers.masking_utils import find_packed_sequence_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils.versions import require_version

require_version("transformers>=4.50", "Gemma 3 and `compute_loss_func` need transformers>=4.50.")
require_version("datasets>=3.0", "To fix: pip install -r requirements.txt")
require_version("peft>=0.14", "To fix: pip install -r requirements.txt")

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
RUN_FLAGS_FILE = "run_flags.json"


class UsageError(ValueError):
    """A mistake in the flags or the data: the command line prints its message alone, without a traceback."""


class StopRequested(BaseException):
    """A stop signal (SIGTERM, the launcher's stop request) outside training, where no step is there to finish and
    nothing to checkpoint: the run ends at once, in one line, as Ctrl-C does. A BaseException, like KeyboardInterrupt,
    so that no library's `except Exception` takes it for an error of its own and carries on. StopOutsideTraining
    raises it and holds the signal."""


def one_line(error: BaseException, limit: int = 400) -> str:
    """A library's error message on one line: some span several lines, the last often a generic hint."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InvalidRowError(ValueError):
    """A row that cannot become a training example; `reason` is a short stable code used in reports."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------------
# Arguments: every flag, and every default settled in one place
# ---------------------------------------------------------------------------------------------------


def arg(default: Any = dataclasses.MISSING, help: str = "", choices: Optional[list] = None):
    """A dataclass field carrying its --help text (and choices) for HfArgumentParser. argparse formats help texts
    with %, so a literal % is doubled."""
    metadata = {"help": help.replace("%", "%%"), **({"choices": choices} if choices else {})}
    return field(default=default, metadata=metadata)


@dataclass
class ModelArguments:
    model_name_or_path: str = arg(help="Hub id or local folder of a vision-language model, e.g. google/gemma-3-12b-it.")
    torch_dtype: str = arg("auto", "Dtype of the loaded weights; 'auto' follows --bf16/--fp16, else float32.",
                           ["auto", "bfloat16", "float16", "float32"])
    cache_dir: Optional[str] = arg(None, "Where downloaded models and data are cached.")
    model_revision: str = arg("main", "Model branch, tag or commit to load.")
    trust_remote_code: bool = arg(False, "Allow custom modelling code from the Hub.")


@dataclass
class DataArguments:
    dataset_name: Optional[str] = arg(None, "Hub dataset id, or a local path: a save_to_disk folder, a JSON/JSONL/CSV/"
                                      "Parquet file, a folder of such files, or an image folder with metadata.")
    dataset_config_name: Optional[str] = arg(None, "Hub dataset configuration name.")
    train_split: str = arg("train", "Split used for training.")
    eval_split: Optional[str] = arg(None, "Evaluation split (default: the first of validation, val, valid, dev).")
    test_split: str = arg("test", "Split used by --do_predict.")
    validation_split_percentage: float = arg(10.0, "% of train held out (seeded) for --do_eval without an eval split.")
    image_column: Optional[str] = arg(None, "Column holding the image(s).")
    question_column: Optional[str] = arg(None, "Column holding the question.")
    answer_column: Optional[str] = arg(None, "Column holding the answer (a string or a list of strings).")
    messages_column: Optional[str] = arg(None, "Chat column: role/content messages or LLaVA from/value turns.")
    system_prompt: Optional[str] = arg(None, "System message added to every row that has none of its own.")
    question_template: str = arg("{question}", "How the question is written in the user turn; needs a {question} slot.")
    caption_instruction: str = arg("Describe this image.", "User turn for caption-only data (image + caption/text).")
    max_train_samples: Optional[int] = arg(None, "Use at most this many training rows (cut before any per-row work).")
    max_eval_samples: Optional[int] = arg(None, "Use at most this many evaluation rows (cut before any per-row work).")
    sample_selection: str = arg("first", "How --max_*_samples picks rows: the first N, or N at random (seeded by "
                                "--seed).", ["first", "random"])
    max_seq_length: int = arg(1024, "Longest sequence in tokens (image tokens included). Longer rows have their last "
                              "answer cut at the tail when that keeps part of it, else they are invalid ('too_long').")
    padding_strategy: Optional[str] = arg(
        None, "Batch length: 'longest' row of the batch, always 'max_length' (--max_seq_length), or the smallest of "
        "--length_buckets that fits ('bucket'). Default: 'bucket' in Gaudi lazy mode, where every new shape compiles "
        "a new graph, else 'longest'.", ["longest", "max_length", "bucket"])
    # None until settle_length_buckets chooses them from the data (settle_defaults checks given ones).
    length_buckets: Optional[list[int]] = arg(
        None, "Lengths for --padding_strategy bucket; the largest must be --max_seq_length. Default: up to 4 lengths "
        "chosen from the rows' token lengths to pad least (1/4, 1/2, 3/4 and all of --max_seq_length where no lengths "
        "are measured).")
    fixed_image_size: Optional[list[int]] = arg(
        None, "HEIGHT WIDTH: resize every image to this size first, so families with dynamic resolution (Qwen2.5-VL, "
        "LLaVA-NeXT) give every image the same number of tokens (static shapes on Gaudi).")
    image_min_pixels: Optional[int] = arg(None, "Qwen2.5-VL: smallest image area (pixels) after its own resizing.")
    image_max_pixels: Optional[int] = arg(None, "Qwen2.5-VL: largest image area (pixels) after its own resizing.")
    pan_and_scan: bool = arg(False, "Gemma 3: also show the model crops of each image whose aspect ratio reaches "
                             "--pan_and_scan_min_ratio (each crop costs as many tokens as the image), in training, "
                             "evaluation, generation and the merged model's processor.")
    pan_and_scan_max_crops: Optional[int] = arg(None, "Most crops per image with --pan_and_scan (default: the "
                                                "processor's).")
    pan_and_scan_min_crop_size: Optional[int] = arg(None, "Smallest crop side in pixels with --pan_and_scan (default: "
                                                    "the processor's).")
    pan_and_scan_min_ratio: Optional[float] = arg(None, "Aspect ratio (long side / short side) from which "
                                                  "--pan_and_scan crops an image (default: the processor's).")
    packing: bool = arg(
        False, "Training and evaluation-loss batches of packs: whole rows laid end to end (best fit, decreasing, "
        "within a seeded shuffled window), each row attending only to itself, positions restarting at each row; "
        "--per_device_*_batch_size then counts packs. Generation is not packed. Needs --validate_rows full.")
    packing_length: Optional[int] = arg(
        None, "Tokens per pack with --packing (one fixed shape). Default: chosen from the rows' measured lengths, the "
        "shortest multiple of 16, from the one holding the longest row up to 4 times that, that packs them with at "
        "most 3% padding (else the one leaving least).")
    invalid_rows: str = arg("error", "What a bad row does: 'error' stops at the first one naming it; 'skip' drops it, "
                            "counts it and lists it in skipped_rows.json.", ["error", "skip"])
    validate_rows: str = arg(
        "full", "'full': before the model loads, check every selected row (schema, text, chat template, image "
        "headers, token length) and report all bad rows at once (cached, so a rerun is instant); 'none': find bad "
        "rows only when a batch reaches them.", ["full", "none"])

    def __post_init__(self):
        if "{question}" not in self.question_template:
            raise UsageError(f"--question_template must contain a {{question}} slot, got {self.question_template!r}.")
        try:
            self.question_template.format(question="")
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(f"--question_template {self.question_template!r} has a slot other than {{question}} "
                             f"({e!r}); write literal braces as {{{{ and }}}}.") from e
        if not 0 < self.validation_split_percentage < 100:
            raise UsageError("--validation_split_percentage must be between 0 and 100 (exclusive).")
        for flag in ("max_train_samples", "max_eval_samples", "max_seq_length"):
            value = getattr(self, flag)
            if value is not None and value <= 0:
                raise UsageError(f"--{flag} must be a positive integer, got {value}.")
        size = self.fixed_image_size
        if size is not None and (len(size) != 2 or min(size) <= 0):
            raise UsageError(f"--fixed_image_size takes HEIGHT WIDTH (two positive numbers), got {size}.")
        if self.packing_length is not None and not self.packing:
            raise UsageError("--packing_length sets the length of --packing's packs; add --packing or drop it.")
        if self.packing_length is not None and self.packing_length <= 0:
            raise UsageError(f"--packing_length must be a positive integer, got {self.packing_length}.")
        if self.packing and self.validate_rows == "none":
            raise UsageError("--packing fills packs from the rows' token lengths, which --validate_rows none does not "
                             "measure: use --validate_rows full.")
        for flag in PAN_AND_SCAN_FLAGS[1:]:
            value = getattr(self, flag)
            if value is not None and not self.pan_and_scan:
                raise UsageError(f"--{flag} sets how --pan_and_scan crops images; add --pan_and_scan or drop it.")
            if value is not None and value <= 0:
                raise UsageError(f"--{flag} must be positive, got {value}.")


# --pan_and_scan and its settings, in the order of ModelFamily.pan_and_scan_kwargs.
PAN_AND_SCAN_FLAGS = ("pan_and_scan", "pan_and_scan_max_crops", "pan_and_scan_min_crop_size", "pan_and_scan_min_ratio")


@dataclass
class EvaluationArguments:
    generation_eval: bool = arg(
        False, "With --do_eval / --do_predict, also answer each evaluated row by greedy generation and score it: "
        "relaxed accuracy (ChartQA), exact match and ANLS. Answers go to predictions.jsonl.")
    generation_max_new_tokens: int = arg(32, "Longest generated answer, in tokens.")
    eval_before_training: bool = arg(False, "Also evaluate the untouched model before training; log both side by side.")
    metrics_group_column: str = arg("human_or_machine", "When the dataset has this column, generation metrics are "
                                    "also reported per value.")

    def __post_init__(self):
        if self.generation_max_new_tokens <= 0:
            raise UsageError(f"--generation_max_new_tokens must be positive, got {self.generation_max_new_tokens}.")


@dataclass
class RunArguments:
    non_finite_loss: str = arg("error", "A NaN/inf training loss: 'error' stops naming the step and rows; 'skip' "
                               "drops that batch.", ["error", "skip"])
    dry_run_data: Optional[int] = arg(None, "Build this many training batches, check them (trained tokens, one <bos>, "
                                      "image tokens), log one decoded example, and exit without loading the model.")
    min_free_disk_gb: float = arg(1.0, "Refuse to start with less free space than this in --output_dir.")
    merge_adapter: bool = arg(False, "Write <output_dir>/merged (base + LoRA as safetensors, processor, generation "
                              "config): after training, or without --do_train from the run's adapter (--adapter_path, "
                              "else the one trained in --output_dir).")
    adapter_path: Optional[str] = arg(None, "A saved LoRA adapter folder to evaluate (--do_eval, --do_predict), merge "
                                      "or answer --predict_question with, without training. Without it, such runs use "
                                      "the adapter trained in --output_dir, else the base model.")
    predict_image: Optional[str] = arg(None, "Answer --predict_question about this image file and exit (no dataset).")
    predict_question: Optional[str] = arg(None, "The question for --predict_image.")

    def __post_init__(self):
        if (self.predict_image is None) != (self.predict_question is None):
            raise UsageError("--predict_image and --predict_question go together; give both or neither.")


@dataclass
class LoraArguments:
    lora_rank: int = arg(16, "LoRA rank r.")
    lora_alpha: float = arg(32.0, "LoRA scaling numerator (scale = alpha / rank).")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA branch.")
    lora_target_modules: Optional[list[str]] = arg(
        None, "Module names to adapt (suffixes such as q_proj v_proj), or one regular expression matched against "
        "full module names. Default: every linear layer of the language model's attention and MLP.")
    train_vision_tower: bool = arg(False, "Also put LoRA on the vision tower's linear layers (frozen by default).")
    train_projector: bool = arg(False, "Also train the vision-to-text projector in full (saved with the adapter; "
                                "frozen by default).")
    vision_learning_rate: Optional[float] = arg(None, "Learning rate of the vision tower's LoRA weights (needs "
                                                "--train_vision_tower; default: --learning_rate).")
    projector_learning_rate: Optional[float] = arg(None, "Learning rate of the projector (needs --train_projector; "
                                                   "default: --learning_rate).")

    def __post_init__(self):
        if self.lora_target_modules and self.train_vision_tower:
            raise UsageError("--train_vision_tower extends the default LoRA targets; with --lora_target_modules, name "
                             "the vision tower's layers there instead.")
        if self.lora_rank <= 0:
            raise UsageError(f"--lora_rank must be positive, got {self.lora_rank}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        needs = {"vision_learning_rate": "train_vision_tower", "projector_learning_rate": "train_projector"}
        for flag, trained in needs.items():
            value = getattr(self, flag)
            if value is not None and not getattr(self, trained):
                raise UsageError(f"--{flag} applies to the weights --{trained} trains; add --{trained} or drop it.")
            if value is not None and value < 0:
                raise UsageError(f"--{flag} must not be negative, got {value}.")


@dataclass
class PortableTrainingArguments(TrainingArguments):
    """The stock TrainingArguments plus --attn_implementation, which GaudiTrainingArguments has on Gaudi."""

    attn_implementation: Optional[str] = arg(
        None, "Attention kernel (default: the model's own choice). gaudi_fused_sdpa needs Intel Gaudi.",
        ["eager", "sdpa", "flash_attention_2", "gaudi_fused_sdpa"])


@dataclass
class ScriptArguments:
    """Every argument group, parsed and settled by `parse_args`."""

    model: ModelArguments
    data: DataArguments
    lora: LoraArguments
    evaluation: EvaluationArguments
    run: RunArguments
    training: TrainingArguments  # GaudiTrainingArguments where Habana's stack is installed
    given: dict = field(default_factory=dict)  # the flags as given, recorded with a run to recognize it again


def parse_args(argv: Optional[list[str]] = None) -> ScriptArguments:
    """Parse the flags (or one JSON file) and settle every default, in this one place."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        argv = json_flags(argv[0])
    given = flags_given(argv)
    if missing_gaudi_packages():
        refuse_gaudi_flags(given)
    # Under mpirun the rank must be in the environment before the training arguments pick the device.
    export_mpi_rank_environment()
    groups = [ModelArguments, DataArguments, LoraArguments, EvaluationArguments, RunArguments]
    # Abbreviated flags are refused, so `given` always names the flag itself.
    parser = ScriptArgumentParser(groups + [training_arguments_class(given)], allow_abbrev=False)
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    known = {option[2:] for action in parser._actions for option in action.option_strings}
    refuse_unknown_flags([word.split("=")[0] for word in remaining if word.startswith("--")] or remaining, known)
    args = ScriptArguments(*parsed, given=given)
    settle_defaults(args, given)
    return args


class ScriptArgumentParser(HfArgumentParser):
    """HfArgumentParser whose error for a bad flag value is one line naming the flag, not the whole usage text."""

    def error(self, message: str):
        raise UsageError(f"{message}. See --help.")


def refuse_unknown_flags(unknown: list[str], known: set[str]) -> None:
    if unknown:
        close = {word: difflib.get_close_matches(word.lstrip("-"), known, 1) for word in unknown}
        hints = [word + "".join(f" (did you mean --{match}?)" for match in close[word]) for word in unknown]
        raise UsageError(f"Unknown flag{'s' * (len(unknown) > 1)}: {', '.join(hints)}. See --help.")


def json_flags(path: str) -> list[str]:
    """A JSON file of {flag: value} as command-line words, so it goes through the same checks as flags do."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read the flags from it ({e}).") from e
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected one JSON object of flag names and values.")
    words = []
    for name, value in config.items():
        values = value if isinstance(value, list) else [] if value is None else [value]
        words += [f"--{name}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values)]
    return words


def flags_given(argv: list[str]) -> dict[str, str]:
    """{flag name (with underscores, as the field is named): value as written} for every flag on the command line."""
    given = {}
    for word, following in zip(argv, argv[1:] + [""]):
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            given[name.replace("-", "_")] = value or ("" if following.startswith("-") else following)
    return given


# GaudiTrainingArguments' own flags, named here only to refuse them clearly where Habana's stack is missing.
GAUDI_ONLY_FLAGS = (
    "use_habana", "use_lazy_mode", "gaudi_config_name", "use_hpu_graphs", "use_hpu_graphs_for_training",
    "use_hpu_graphs_for_inference", "disable_tensor_cache_hpu_graphs", "max_hpu_graphs", "pipelining_fwd_bwd",
    "throughput_warmup_steps", "adjust_throughput", "distribution_strategy", "flash_attention_recompute",
    "flash_attention_causal_mask", "flash_attention_fast_softmax", "use_compiled_autograd", "compile_dynamic",
    "non_blocking_data_copy", "profiling_warmup_steps", "profiling_steps", "profiling_record_shapes",
)


def refuse_gaudi_flags(given: dict[str, str]) -> None:
    gaudi_flags = [f"--{name}" for name in GAUDI_ONLY_FLAGS if name in given]
    if given.get("attn_implementation") == "gaudi_fused_sdpa":
        gaudi_flags.append("--attn_implementation gaudi_fused_sdpa")
    if gaudi_flags:
        raise UsageError(f"{', '.join(gaudi_flags)} need Intel Gaudi, but {missing_gaudi_packages()} not installed "
                         "here. On a Gaudi machine use Habana's PyTorch container and `pip install -r "
                         "requirements.txt`; on CPU or CUDA drop these flags.")


def settle_defaults(args: ScriptArguments, given: dict[str, str]) -> None:
    """Defaults that depend on other flags or on the platform, and settings the pipeline relies on."""
    data, training = args.data, args.training
    on_gaudi = getattr(training, "use_habana", False)
    if on_gaudi:
        settle_execution_mode(training, lazy_flag_given="use_lazy_mode" in given)
    if data.padding_strategy is None:
        # Gaudi lazy mode compiles a graph per input shape; a few fixed lengths keep that bounded.
        data.padding_strategy = "bucket" if on_gaudi and training.use_lazy_mode else "longest"
    if data.length_buckets is not None:
        data.length_buckets = sorted(set(data.length_buckets))
        if not data.length_buckets or data.length_buckets[0] <= 0 or data.length_buckets[-1] != data.max_seq_length:
            raise UsageError(f"--length_buckets {data.length_buckets}: lengths must be positive and the largest must "
                             f"equal --max_seq_length {data.max_seq_length}.")
    packs_per_batch = [training.per_device_train_batch_size] * training.do_train + [
        training.per_device_eval_batch_size] * (training.do_eval or training.do_predict)
    flash = getattr(training, "attn_implementation", None) == "flash_attention_2"
    if data.packing and flash and max(packs_per_batch, default=1) > 1:
        # transformers 4.55.4 hands flash attention the rows of a pack only for a batch of one pack
        # (modeling_flash_attention_utils.py:439-452); in larger batches the rows would see each other.
        raise UsageError("--packing with --attn_implementation flash_attention_2 needs --per_device_train_batch_size 1 "
                         "and --per_device_eval_batch_size 1 (one pack per batch).")
    hpu_graphs_for_inference = getattr(training, "use_hpu_graphs_for_inference", False)
    if hpu_graphs_for_inference and training.do_train and args.evaluation.eval_before_training:
        # HPU graphs detach gradients (optimum/habana/transformers/trainer.py:2057), so a model wrapped for the
        # evaluation before training could not be trained.
        raise UsageError("--use_hpu_graphs_for_inference cannot go with --eval_before_training and --do_train.")
    if (args.lora.train_vision_tower or args.lora.train_projector) and "ddp_find_unused_parameters" not in given:
        # Trained vision weights can go without gradients in a step, a DDP error: a batch without an image (a
        # text-only row, or the stand-in for skipped rows) runs neither tower nor projector, and some families read an
        # inner vision layer (LLaVA-NeXT: the second to last), leaving the later layers' LoRA weights unused.
        # GaudiTrainingArguments defaults this to False, not None
        # (optimum/habana/transformers/training_args.py:353-356), so only the flag itself wins.
        training.ddp_find_unused_parameters = True
    # The collator reads the raw columns; the trainer must not drop them.
    training.remove_unused_columns = False
    # PEFT's wrapper hides `labels` from the trainer's signature inspection.
    training.label_names = ["labels"]
    # Evaluation needs the loss only; gathering full-vocabulary logits would exhaust memory.
    training.prediction_loss_only = True
    if training.gradient_checkpointing and training.gradient_checkpointing_kwargs is None:
        # Re-entrant checkpointing gives no gradient to LoRA weights behind frozen embeddings.
        training.gradient_checkpointing_kwargs = {"use_reentrant": False}
    accelerated = on_gaudi or torch.accelerator.is_available()
    if "dataloader_pin_memory" not in given and not accelerated:
        # Pinned host memory only helps copies to an accelerator; without one torch warns on every loader.
        training.dataloader_pin_memory = False
    if "dataloader_num_workers" not in given and accelerated:
        # Decode and resize images in background workers while the device computes (this rank's share of the cores).
        training.dataloader_num_workers = min(4, max(0, cores_of_this_rank() - 1))
        training.dataloader_persistent_workers = training.dataloader_num_workers > 0
    if training.do_train:
        if args.run.adapter_path:
            raise UsageError("--adapter_path names an adapter to evaluate, predict with or merge without training; "
                             "with --do_train a new adapter is trained: drop one of the two.")
        training.resume_from_checkpoint = checkpoint_to_resume(training)
        check_free_disk(training.output_dir, args.run.min_free_disk_gb)


# What a Hub repository id looks like ("name" or "owner/name"); anything else is a local path.
HUB_ID = re.compile(r"(?!\.)(?!.*\.\.)[\w.-]+(/[\w.-]+)?")


def check_paths(args: ScriptArguments) -> None:
    """Every path flag names something that exists, checked before anything loads: a name that cannot be a Hub id
    (or any name, with HF_HUB_OFFLINE=1) must be there locally, so a mistyped path is never sent to the Hub."""
    # A "~" the shell left alone (in a JSON flags file, or after "--flag="), expanded once for every later use.
    for owner, flag in ((args.model, "model_name_or_path"), (args.run, "adapter_path"), (args.data, "dataset_name"),
                        (args.run, "predict_image"), (args.training, "resume_from_checkpoint")):
        value = getattr(owner, flag)
        if isinstance(value, str) and value.startswith("~"):
            setattr(owner, flag, os.path.expanduser(value))
    offline = transformers.utils.is_offline_mode()
    hub_or_local = {"model_name_or_path": (args.model.model_name_or_path, "config.json",
                                           "a model folder saved with save_pretrained"),
                    "adapter_path": (args.run.adapter_path, "adapter_config.json",
                                     "an adapter folder written by training, or a checkpoint-N folder in it")}
    for flag, (name, marker, what) in hub_or_local.items():
        path = None if name is None else Path(name)
        if path is None:
            continue
        if path.is_dir():
            if not (path / marker).is_file():
                raise UsageError(f"--{flag} {name}: the folder holds no {marker}; expected {what}.")
        elif path.exists():
            raise UsageError(f"--{flag} {name}: is a file; expected {what}.")
        elif not HUB_ID.fullmatch(name):
            raise UsageError(f"--{flag} {name}: no such folder (expected {what}).")
        elif offline and not cached_on_hub(name, marker, args.model, flag == "model_name_or_path"):
            raise UsageError(f"--{flag} {name}: no such local folder, and HF_HUB_OFFLINE=1 keeps the Hub from being "
                             "asked (nor is it in the Hub cache). Fix the path, or unset HF_HUB_OFFLINE to download.")
    dataset = args.data.dataset_name
    looks_local = dataset is not None and (not HUB_ID.fullmatch(dataset) or Path(dataset).suffix in DATA_FILE_BUILDERS)
    if looks_local and not Path(dataset).exists():
        raise UsageError(f"--dataset_name {dataset}: no such file or folder (expected a Hub dataset id, a save_to_disk "
                         f"folder, a {'/'.join(sorted(DATA_FILE_BUILDERS))} file or a folder of them).")
    for flag, value in (("predict_image", args.run.predict_image),
                        ("resume_from_checkpoint", args.training.resume_from_checkpoint)):
        if isinstance(value, str) and not Path(value).exists():
            raise UsageError(f"--{flag} {value}: no such {'file' if flag == 'predict_image' else 'folder'}.")


def check_adapter_crops(args: ScriptArguments) -> None:
    """A run that evaluates, predicts with, merges or asks a question of an adapter trained with --pan_and_scan (its
    saved processor crops) but is not given the flag would show it no crops: refused in one line naming the flags
    that crop as in training. Given other crop settings than training's, the run uses them: an explicit choice."""
    if args.data.pan_and_scan or (args.training.do_train and not training_finished(args.training)):
        return
    adapter = adapter_for_run(args)
    saved = Path(adapter or "", "preprocessor_config.json")
    settings = {}
    if adapter is not None and saved.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            settings = json.loads(saved.read_text())
    for family in MODEL_FAMILIES.values():
        names = family.pan_and_scan_kwargs
        if names and settings.get(names[0]):
            flags = " ".join(f"--{flag} {settings[name]}" for flag, name in zip(PAN_AND_SCAN_FLAGS[1:], names[1:])
                             if name in settings)
            raise UsageError(f"The adapter in {adapter} was trained on images and their pan-and-scan crops, which "
                             f"this run would not show it: add --pan_and_scan {flags}")


def cached_on_hub(repo_id: str, filename: str, model_args: ModelArguments, pinned: bool) -> bool:
    """Whether the Hub cache holds `filename` of `repo_id`: at --model_revision for the model (`pinned`), at the default
    branch for an adapter, which is loaded there."""
    from huggingface_hub import try_to_load_from_cache
    revision = model_args.model_revision if pinned else None
    return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=model_args.cache_dir, revision=revision), str)


def cores_of_this_rank() -> int:
    """The CPU cores this process may use: those it is bound to (mpirun binds each rank to its own), or else its
    share of the machine's among the node's ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < (os.cpu_count() or cores):
        return cores
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def settle_execution_mode(training_args, lazy_flag_given: bool) -> None:
    """Make --use_lazy_mode agree with PT_HPU_LAZY_MODE, which Habana's bridge reads when it is imported; without
    the flag (which GaudiTrainingArguments turns on by default) the environment decides."""
    env_value = os.environ.get("PT_HPU_LAZY_MODE")
    if env_value not in ("0", "1"):
        raise UsageError(f"PT_HPU_LAZY_MODE is {'unset' if env_value is None else repr(env_value)}: set "
                         "PT_HPU_LAZY_MODE=1 (lazy mode, with --use_lazy_mode) or PT_HPU_LAZY_MODE=0 (eager mode) "
                         "before the command.")
    lazy_env = env_value == "1"
    if not lazy_flag_given:
        training_args.use_lazy_mode = lazy_env
    elif training_args.use_lazy_mode != lazy_env:
        fix = "drop --use_lazy_mode" if training_args.use_lazy_mode else "add --use_lazy_mode"
        raise UsageError(f"PT_HPU_LAZY_MODE={env_value} asks for {'lazy' if lazy_env else 'eager'} mode but "
                         f"--use_lazy_mode is {training_args.use_lazy_mode}: {fix}, or set "
                         f"PT_HPU_LAZY_MODE={int(not lazy_env)}.")


def checkpoint_to_resume(training_args) -> Optional[str]:
    """The checkpoint to resume from; refuse to train into a non-empty folder that holds none."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    if training_args.overwrite_output_dir or not output_dir.is_dir():
        return None
    last_checkpoint = last_complete_checkpoint(output_dir)
    if last_checkpoint is None and any(p.name != "skipped_rows.parts" for p in output_dir.iterdir()):
        raise UsageError(f"--output_dir {output_dir} is not empty and holds no checkpoint to resume from. Pass "
                         "--overwrite_output_dir to train over it, or choose another folder.")
    return last_checkpoint


def training_finished(training_args) -> bool:
    """Whether --output_dir holds this training, finished: adapter and results saved, and the last checkpoint at the
    final step of the same schedule (--max_steps, or else --num_train_epochs)."""
    output_dir, checkpoint = Path(training_args.output_dir), training_args.resume_from_checkpoint
    if not (training_args.do_train and checkpoint and (output_dir / "train_results.json").is_file()):
        return False
    try:
        state = json.loads(Path(checkpoint, "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if training_args.max_steps > 0:
        same_schedule = state.get("max_steps") == training_args.max_steps
    else:  # under --max_steps the Trainer records the epochs it derived, so they are compared only here
        same_schedule = state.get("num_train_epochs") == math.ceil(training_args.num_train_epochs)
    return same_schedule and state.get("global_step") == state.get("max_steps")


def same_command_finished(args: ScriptArguments) -> bool:
    """Whether this very command (the same flags) already ran to its end in --output_dir: nothing is left to do."""
    try:
        recorded = json.loads(Path(args.training.output_dir, RUN_FLAGS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == args.given and training_finished(args.training)


def last_complete_checkpoint(output_dir: Path) -> Optional[str]:
    """The newest checkpoint folder whose trainer_state.json (written last) is whole. What this adds to
    transformers.trainer_utils.get_last_checkpoint: a checkpoint cut short while being written is passed over."""
    steps = sorted(
        (int(match.group(1)), path)
        for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.is_dir() and (match := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name))
    )
    for step, path in reversed(steps):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads((path / "trainer_state.json").read_text()).get("global_step") == step:
                return str(path)
        logger.warning(f"Ignoring incomplete checkpoint {path} (no whole trainer_state.json).")
    return None


def check_free_disk(output_dir: str, min_free_gb: float) -> None:
    existing = Path(output_dir).resolve()
    while not existing.exists():
        existing = existing.parent
    free_gb = shutil.disk_usage(existing).free / 2**30
    if free_gb < min_free_gb:
        raise UsageError(f"Only {free_gb:.2f} GiB free under {existing}, below --min_free_disk_gb {min_free_gb}: "
                         "checkpoints would fail mid-run. Free some space or choose another --output_dir.")


# ---------------------------------------------------------------------------------------------------
# Entry point and the training path
# ---------------------------------------------------------------------------------------------------


def cli(argv: Optional[list[str]] = None) -> int:
    """Command-line entry, returning the exit code: one question, a merge or a data dry run, else training (`main`)."""
    with StopOutsideTraining() as stop:
        try:
            args = parse_args(argv)
            check_paths(args)
            check_adapter_crops(args)
            if args.run.predict_image is not None:
                print(answer_one_question(args))
            elif args.run.merge_adapter and not (args.training.do_train or args.training.do_eval
                                                 or args.training.do_predict):
                merge_saved_adapter(args)
            elif args.run.dry_run_data:
                dry_run_data(args)
            elif same_command_finished(args):
                print(f"{args.training.output_dir} holds this command's finished run: nothing to do, nothing changed. "
                      "Pass --overwrite_output_dir to run it again.", file=sys.stderr)
            else:
                main(args)
        except KeyboardInterrupt:
            # Ctrl-C outside training (while loading, checking rows or evaluating); training handles it itself,
            # saving a checkpoint first (PreemptionHandler).
            print("error: interrupted (Ctrl-C).", file=sys.stderr)
            return 130
        except StopRequested:
            return stop.report()
        except UsageError as e:
            # A mistake in the flags or the data: one line saying what to change, no traceback. A DataLoader worker's
            # error arrives with the worker's traceback in its message (torch/_utils.py:774-789): its last line is
            # ours.
            message = str(e).rstrip().splitlines()[-1].removeprefix(f"{UsageError.__name__}: ")
            print(f"error: {message}", file=sys.stderr)
            return 2
        except Exception:
            # Code cleaning up after the stop may raise an error of its own in its place (datasets.map's worker pool
            # raises a TimeoutError for the results it no longer waits for, datasets/utils/py_utils.py:626).
            if stop.received():
                return stop.report()
            raise
    return 0


class StopOutsideTraining:
    """While entered, SIGTERM and the launcher's stop request raise StopRequested: by default either kills the
    process (and a launcher reports a rank killed by a signal), where outside training there is no step to finish
    and nothing to checkpoint. Training puts its own handlers over these for its duration (PreemptionHandler).
    Processes forked meanwhile (datasets.map's pool, DataLoader workers) inherit the handler: in them the signal does
    what it does by default, so that a worker ends quietly and its parent reports the stop."""

    def __init__(self):
        self.signum = 0  # the stop signal received; 0 for none
        self.pid = os.getpid()
        self.previous: dict = {}

    def __enter__(self) -> "StopOutsideTraining":
        if threading.current_thread() is threading.main_thread():  # the only thread that may set signal handlers
            self.previous = {signum: signal.signal(signum, self.request)
                             for signum in (signal.SIGTERM, LAUNCHER_STOP_SIGNAL)}
        return self

    def __exit__(self, *exception) -> None:
        PreemptionHandler.restore(self.previous)

    def request(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        raise StopRequested(signal.Signals(signum).name)

    def received(self) -> int:
        return self.signum

    def report(self) -> int:
        """Say that the run stopped, in one line; the exit code."""
        print(f"error: stopped ({signal.Signals(self.signum).name}) outside training: no step to finish, nothing to "
              "save. Run the same command again to go on.", file=sys.stderr)
        return PREEMPTED_EXIT_CODE


def main(args: ScriptArguments) -> Trainer:
    """Train and evaluate as the arguments say; returns the trainer, whose model holds the trained adapter."""
    model_args, data_args, training_args = args.model, args.data, args.training
    # Logging and seed.
    setup_run(training_args)

    # Model family and processor, from the model's config, before any data is read.
    config, family, processor = load_processor(model_args)
    check_gemma3_hpu_attention_flags(config.model_type, training_args)

    # Data: each split's rows, chosen by index only (images are decoded per batch, by the collator).
    splits, schema, image_base_dir = load_data(data_args, training_args, model_args.cache_dir)
    skipped_rows = SkippedRows.for_run(training_args, data_args.invalid_rows)

    # Encoder and collator: one chat encoder; labels keep the assistant's tokens only.
    encoder = ChatEncoder(processor, family, schema, data_args, image_base_dir)
    settle_gaudi_image_size(encoder, config, splits, training_args)
    # Every selected row checked before the model loads (bad rows stop the run, or are dropped); buckets from lengths.
    splits = validate_rows(encoder, splits, skipped_rows, training_args, model_args.cache_dir)
    settle_length_buckets(encoder, splits, training_args)
    settle_packs(encoder, splits, training_args)
    image_rows = gaudi_image_rows(encoder, splits, training_args)
    collator = VisionChatCollator(encoder, data_args, skipped_rows, hpu_model_inputs(training_args, family), config,
                                  image_rows)
    if training_args.should_log:
        log_trained_sample(collator, splits)

    # Model: a new LoRA to train on the language model (and the vision tower or projector when asked), or, for a run
    # that does not train (a finished training asked for more), the adapter it evaluates, logged.
    trains = training_args.do_train and not training_finished(training_args)
    model = load_model(model_args, training_args, config)
    model = apply_lora(model, args.lora, family) if trains else with_adapter(model, adapter_for_run(args), model_args)
    use_gemma3_reference_attention(model, training_args)

    # Trainer: GaudiTrainer on Gaudi, the stock Trainer elsewhere.
    trainer = build_trainer(model, training_args, model_args, args.run, processor, splits, collator, args.lora)

    # Train, stopping cleanly on SIGTERM or Ctrl-C; an evaluation of the untouched model first, if asked.
    generator = (GenerationEvaluator.for_run(encoder, skipped_rows, args, image_rows)
                 if args.evaluation.generation_eval else None)
    before = {}
    if trains:
        if training_args.do_eval and args.evaluation.eval_before_training:
            before = evaluate_split(trainer, splits["eval"], "eval_before", generator)
        train_and_save(trainer, len(splits["train"]))

    # Evaluate: loss and perplexity over assistant tokens and, if asked, generation metrics.
    evaluate_splits(trainer, splits, generator, before)

    # Outputs: the skipped-row report once every rank has written its part; the merged model if asked.
    write_outputs(trainer, skipped_rows, processor, args)
    return trainer


def setup_run(training_args) -> None:
    """Logging for this process and the seed. This script's own lines show on the first rank; the libraries' (config
    dumps, file-by-file save notices, Hub hints) only with --log_level info or debug, warnings always."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stderr)])
    chosen = training_args.log_level if training_args.should_log else training_args.log_level_replica
    # "passive" would keep whatever verbosity an earlier run in this process left; here it means warnings.
    library_level = logging.WARNING if chosen == "passive" else logging.getLevelName(chosen.upper())
    logger.setLevel(logging.INFO if training_args.should_log and chosen == "passive" else library_level)
    datasets.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.set_verbosity(library_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.log(logging.INFO if training_args.world_size > 1 else logging.DEBUG,
               f"Process rank: {training_args.process_index}, device: {training_args.device}, "
               f"world size: {training_args.world_size}, bf16: {training_args.bf16}")
    set_seed(training_args.seed)


# ---------------------------------------------------------------------------------------------------
# Model families: the processor, and what the script knows about each `model_type`
# ---------------------------------------------------------------------------------------------------


def load_processor(model_args: ModelArguments):
    """The config, the family entry picked from config.model_type (never from the model's name), and the processor."""
    path, hub = model_args.model_name_or_path, hub_kwargs(model_args)
    try:
        config = AutoConfig.from_pretrained(path, **hub)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model_name_or_path {path}: cannot load its config ({one_line(e)})") from e
    family = model_family(config.model_type)
    # The checkpoint's own (slow) image processor gives the pixels the model was trained with; asking for it with
    # use_fast=False would also swap in the slow tokenizer, which has no offsets (processing_utils.py:1349-1368,
    # image_processing_auto.py:528-533), so the notice that fast processors will become the default is silenced.
    notices = [logging.getLogger("transformers.processing_utils"),
               logging.getLogger("transformers.models.auto.image_processing_auto")]
    levels = [notice.level for notice in notices]
    for notice in notices:
        notice.setLevel(logging.ERROR)
    try:
        processor = AutoProcessor.from_pretrained(path, **hub)
    except ImportError as e:
        if family.image_only_processor_class is None or "torchvision" not in str(e).lower():
            raise
        processor = family.image_only_processor_class().from_pretrained(path, **hub)
    except OSError as e:
        raise UsageError(f"--model_name_or_path {path}: cannot load its processor ({one_line(e)})") from e
    finally:
        for notice, level in zip(notices, levels):
            notice.setLevel(level)
    if not processor.chat_template:
        raise UsageError(f"{path} has no chat template, which the collator needs to find the assistant's tokens; use "
                         "an instruction-tuned checkpoint (e.g. google/gemma-3-12b-it).")
    return config, family, processor


def hub_kwargs(model_args: ModelArguments) -> dict:
    return {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision,
            "trust_remote_code": model_args.trust_remote_code}


def model_family(model_type: str) -> ModelFamily:
    if model_type not in MODEL_FAMILIES:
        raise UsageError(f"Model type '{model_type}' is not supported; supported model types: "
                         f"{', '.join(sorted(MODEL_FAMILIES))}.")
    return MODEL_FAMILIES[model_type]


@dataclass(frozen=True)
class ModelFamily:
    """What the script needs to know about one model family (one MODEL_FAMILIES entry per `model_type`). LoRA
    targets need no entry: they are found in the module tree (the language model's linear layers)."""
    # The chat template writes image_placeholder(processor) once per image; the processor replaces it by a longer
    # text, the image's tokens. Knowing how long moves assistant spans found in the rendered chat onto the tokens.
    image_placeholder: Callable[[Any], str]
    image_token_counts: Callable[[Any, dict], list]  # (processor, processed batch) -> image tokens of each image
    expanded_length: Callable[[Any, int], int]  # (processor, count) -> characters the placeholder then becomes
    # Processor outputs the model needs besides the text, one entry per image, except that patches_per_image (if set)
    # says how many rows of a patch-concatenated `pixel_values` each image owns.
    image_inputs: tuple = ("pixel_values",)
    patches_per_image: Optional[Callable[[dict], list]] = None
    processor_call_kwargs: dict = field(default_factory=dict)
    hpu_attention_options: bool = False  # the optimum-habana port takes use_flash_attention & co.
    # On Gaudi the script builds the attention masks (Gemma 3's reference attention), so --packing keeps rows apart;
    # the other ports build causal masks over the whole sequence from attention_mask alone.
    packs_on_gaudi: bool = False
    # The processor class where AutoProcessor cannot load one (a video processor this script never uses needs
    # torchvision); built on first use, so that importing this script does not import the family's code.
    image_only_processor_class: Optional[Callable[[], type]] = None
    # Last names of the vision tower and projector modules (for --train_vision_tower / --train_projector).
    vision_tower: str = "vision_tower"
    projector: str = "multi_modal_projector"
    pixel_budget_kwargs: Optional[tuple] = None  # processor arguments for --image_min_pixels / --image_max_pixels
    # Processor arguments for PAN_AND_SCAN_FLAGS, in that order (None: the family has no pan-and-scan), and the crops
    # the processor adds to an image: (those arguments' values, (height, width)) -> number of crops.
    pan_and_scan_kwargs: Optional[tuple] = None
    crop_count: Optional[Callable[[dict, tuple], int]] = None
    # With --packing, where the model's rope positions are not just 0, 1, 2, ... per row: (model config, EncodedRow,
    # processed batch) -> the row's positions as the model computes them for the row alone, shape (3, row length).
    packed_rope_positions: Optional[Callable[[Any, Any, dict], torch.Tensor]] = None


def gemma3_pan_and_scan_crops(settings: dict, size: tuple) -> int:
    """The crops Gemma3ImageProcessor.pan_and_scan cuts from an image of `size` (height, width), from the size alone.
    Written from transformers 4.55.4 models/gemma3/image_processing_gemma3.py:159-196: none below the aspect ratio
    that activates it; along the long side, the ratio rounded half up, at most long side // min crop size, clamped
    to [2, max crops]; none when a crop (long side / crops, rounded up, by the short side) is under the min size."""
    height, width = size
    long_side, short_side = max(height, width), min(height, width)
    if long_side / short_side < settings["pan_and_scan_min_ratio_to_activate"]:
        return 0
    min_crop = settings["pan_and_scan_min_crop_size"]
    crops = min(int(math.floor(long_side / short_side + 0.5)), long_side // min_crop)
    crops = min(settings["pan_and_scan_max_num_crops"], max(2, crops))
    if min(math.ceil(long_side / crops), short_side) < min_crop:
        return 0
    return crops


def gemma3_image_token_counts(processor, processed) -> list:
    """Each image's tokens: one image sequence for the image and one per crop (num_crops, which Gemma3Processor
    drops from its output, processing_gemma3.py:117, is put back by ChatEncoder.encode)."""
    crops = processed.get("num_crops", [0] * len(processed["pixel_values"]))
    return [processor.image_seq_length * (1 + int(n)) for n in crops]


def llava_next_image_token_counts(processor, processed) -> list:
    """LlavaNextProcessor's own count: any-resolution tiling depends on each image's original size."""
    height, width = np.asarray(processed["pixel_values"][0]).shape[-2:]
    default_strategy = processor.vision_feature_select_strategy == "default"
    return [
        processor._get_number_of_features(int(h), int(w), height, width) - int(default_strategy)
        for h, w in np.asarray(processed["image_sizes"])
    ]


@functools.cache
def image_only_qwen2_5_vl_processor_class() -> type:
    """Qwen2.5-VL's processor without its video half (its video processor needs torchvision); the rest unchanged."""
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **init_kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **init_kwargs)
            self.video_processor = None

    # Saved files name their processor class; name the real one, so AutoProcessor can load them elsewhere.
    ImageOnlyQwen2_5_VLProcessor.__name__ = Qwen2_5_VLProcessor.__name__
    return ImageOnlyQwen2_5_VLProcessor


def qwen2_5_vl_rope_positions(config, row, processed: dict) -> torch.Tensor:
    """A Qwen2.5-VL row's 3-D rope index, computed by the model's own get_rope_index on the row alone (what the model
    computes for it inside forward when position_ids is None; it reads only the config,
    modeling_qwen2_5_vl.py:977-1140)."""
    from transformers import Qwen2_5_VLModel

    grids = processed.get("image_grid_thw")
    images = row.image_slice
    grid = torch.as_tensor(np.asarray(grids[images.start:images.stop])) if images.stop > images.start else None
    input_ids = torch.as_tensor(row.input_ids).view(1, -1)
    positions, _ = Qwen2_5_VLModel.get_rope_index(types.SimpleNamespace(config=config), input_ids, grid)
    return positions[:, 0]


MODEL_FAMILIES = {
    "gemma3": ModelFamily(
        image_placeholder=lambda processor: processor.boi_token,
        image_token_counts=gemma3_image_token_counts,
        # Without crops; an image with crops becomes the text ChatEncoder.crop_expansion reads from the processor.
        expanded_length=lambda processor, count: len(processor.full_image_sequence),
        # pixel_values holds each image's row, then one per crop (image_processing_gemma3.py:235).
        patches_per_image=lambda processed: [
            1 + int(n) for n in processed.get("num_crops", [0] * len(processed["pixel_values"]))
        ],
        # Crops only with --pan_and_scan, whatever the checkpoint's image processor says.
        processor_call_kwargs={"do_pan_and_scan": False},
        hpu_attention_options=True,
        packs_on_gaudi=True,
        pan_and_scan_kwargs=("do_pan_and_scan", "pan_and_scan_max_num_crops", "pan_and_scan_min_crop_size",
                             "pan_and_scan_min_ratio_to_activate"),
        crop_count=gemma3_pan_and_scan_crops,
    ),
    "qwen2_5_vl": ModelFamily(
        image_placeholder=lambda processor: processor.image_token,
        image_token_counts=lambda processor, processed: [
            int(np.prod(grid)) // processor.image_processor.merge_size**2 for grid in processed["image_grid_thw"]
        ],
        expanded_length=lambda processor, count: count * len(processor.image_token),
        image_inputs=("pixel_values", "image_grid_thw"),
        patches_per_image=lambda processed: [int(np.prod(grid)) for grid in processed["image_grid_thw"]],
        image_only_processor_class=image_only_qwen2_5_vl_processor_class,
        vision_tower="visual",
        projector="merger",
        pixel_budget_kwargs=("min_pixels", "max_pixels"),
        packed_rope_positions=qwen2_5_vl_rope_positions,
    ),
    "llava_next": ModelFamily(
        image_placeholder=lambda processor: processor.image_token,
        image_token_counts=llava_next_image_token_counts,
        expanded_length=lambda processor, count: count * len(processor.image_token),
        image_inputs=("pixel_values", "image_sizes"),
    ),
}


# ---------------------------------------------------------------------------------------------------
# Data: loading and splits
# ---------------------------------------------------------------------------------------------------


def load_data(data_args: DataArguments, training_args,
              cache_dir: Optional[str]) -> tuple[dict, DatasetSchema, Optional[Path]]:
    """The rows of each split the run uses, the dataset's schema, and the folder relative image paths start from."""
    if data_args.dataset_name is None:
        raise UsageError("--dataset_name is required (a Hub dataset id or a local path).")
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise UsageError("Nothing to do: pass --do_train, --do_eval and/or --do_predict.")
    with training_args.main_process_first(desc="loading the dataset"):
        raw, image_base_dir = load_raw_datasets(data_args, cache_dir)
        splits = prepare_splits(raw, data_args, training_args)
    schema = detect_schema(next(iter(splits.values())).dataset.column_names, data_args)
    logger.info(f"Dataset schema: {schema}; rows: { {name: len(rows) for name, rows in splits.items()} }")
    return splits, schema, image_base_dir


DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_SPLIT_NAMES = ("validation", "val", "valid", "dev")


def load_raw_datasets(data_args: DataArguments,
                      cache_dir: Optional[str]) -> tuple[datasets.DatasetDict, Optional[Path]]:
    """Load every split; also return the folder that relative image paths are resolved against."""
    path = Path(data_args.dataset_name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        return (datasets.DatasetDict({"train": loaded}) if isinstance(loaded, datasets.Dataset) else loaded), path
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise UsageError(f"--dataset_name {path}: unsupported file type; use one of {sorted(DATA_FILE_BUILDERS)}.")
        return datasets.load_dataset(builder, data_files={"train": str(path)}, cache_dir=cache_dir), path.parent
    if path.is_dir():
        data_files = folder_data_files(path)
        if not data_files:  # an image folder, its text in metadata.jsonl/csv/parquet beside the images
            return datasets.load_dataset(str(path), cache_dir=cache_dir), path
        builder = DATA_FILE_BUILDERS[data_files[0].suffix.lower()]
        return datasets.load_dataset(builder, data_files=split_data_files(path, data_files), cache_dir=cache_dir), path
    try:
        return datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir), None
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UsageError(f"--dataset_name {data_args.dataset_name}: no such local file or folder, and the Hub did not "
                         f"provide it ({one_line(e)})") from e


def folder_data_files(folder: Path) -> list[Path]:
    """The JSON/JSONL/CSV/Parquet files directly in a dataset folder, other than an image folder's metadata file.
    What this adds to datasets' own format inference, which counts every file below the folder: a data file beside
    an images/ subfolder is read as the data (image paths relative to the folder), not as an image folder."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_FILE_BUILDERS)
    data_files = [p for p in files if p.stem != "metadata"]
    if data_files and len(data_files) < len(files):
        raise UsageError(f"--dataset_name {folder} reads two ways: as data files {[p.name for p in data_files]}, or as "
                         f"an image folder described by {[p.name for p in files if p.stem == 'metadata']}. Keep one of "
                         "them in the folder, or name the file to use in --dataset_name.")
    if len({DATA_FILE_BUILDERS[p.suffix.lower()] for p in data_files}) > 1:
        raise UsageError(f"Mixed data file types in one folder: {[p.name for p in data_files]}; keep one type.")
    return data_files


def split_data_files(folder: Path, data_files: list[Path]) -> dict[str, list[str]]:
    """{split: files} by datasets' own file-name rules (train*, validation/val/valid/dev*, test*), limited to the data
    files. What this adds: once one file is named after a split, datasets silently leaves out the files that are not;
    here that is an error naming them."""
    # datasets' own rules, but seeing the data files only: get_data_patterns looks at every file below the folder,
    # so images named train_0.png would make a split of their own (datasets/data_files.py:251-292, 387-475).
    data_only = functools.partial(datasets.data_files.resolve_pattern, base_path=str(folder),
                                  allowed_extensions=sorted(DATA_FILE_BUILDERS))
    patterns = datasets.data_files._get_data_files_patterns(data_only)
    resolved = DataFilesDict.from_patterns(patterns, str(folder), allowed_extensions=sorted(DATA_FILE_BUILDERS))
    wanted = {p.resolve(): str(p) for p in data_files}
    splits = {str(split): [wanted[Path(f).resolve()] for f in files if Path(f).resolve() in wanted]
              for split, files in resolved.items()}
    used = {name for files in splits.values() for name in files}
    unused = [p.name for p in data_files if str(p) not in used]
    if unused:
        raise UsageError(f"--dataset_name {folder}: {unused} belong to no split. Name each data file after its split "
                         "(train*, validation* / val* / dev*, test*), or keep none of them named after a split (all "
                         "are then train).")
    return {split: files for split, files in splits.items() if files}


def prepare_splits(raw: datasets.DatasetDict, data_args: DataArguments, training_args) -> dict[str, IndexedRows]:
    """Choose train/eval/test rows by index only; no row is read here, so start-up does not grow with size."""
    train_name, eval_name, seed = data_args.train_split, pick_eval_split(raw, data_args), training_args.seed
    if train_name not in raw and (training_args.do_train or (training_args.do_eval and eval_name is None)):
        raise UsageError(f"Dataset '{data_args.dataset_name}' has no '{train_name}' split (splits: {list(raw)}); "
                         "set --train_split.")
    for name in raw:
        raw[name] = without_image_decoding(raw[name])
    train_rows = eval_rows = None  # None: every row of the split
    if training_args.do_eval and eval_name is None:
        eval_name = train_name
        train_rows, eval_rows = carve_validation(len(raw[eval_name]), data_args.validation_split_percentage, seed)
        logger.info(f"No evaluation split in {list(raw)}: {len(eval_rows)} of {len(raw[eval_name])} '{eval_name}' "
                    f"rows (seed {seed}) are held out for evaluation.")
    if training_args.do_predict and data_args.test_split not in raw:
        raise UsageError(f"--do_predict needs a '{data_args.test_split}' split; found {list(raw)}. Set --test_split.")
    splits = {}
    for stage, needed, name, rows, limit in (
        ("train", training_args.do_train, train_name, train_rows, data_args.max_train_samples),
        ("eval", training_args.do_eval, eval_name, eval_rows, data_args.max_eval_samples),
        ("test", training_args.do_predict, data_args.test_split, None, data_args.max_eval_samples),
    ):
        if needed:
            rows = np.arange(len(raw[name])) if rows is None else rows
            splits[stage] = IndexedRows(raw[name], name, cut_rows(rows, limit, data_args.sample_selection, seed))
    return splits


def pick_eval_split(raw: datasets.DatasetDict, data_args: DataArguments) -> Optional[str]:
    if data_args.eval_split is None:
        return next((name for name in EVAL_SPLIT_NAMES if name in raw), None)
    if data_args.eval_split not in raw:
        raise UsageError(f"--eval_split {data_args.eval_split}: dataset '{data_args.dataset_name}' has splits "
                         f"{list(raw)}.")
    return data_args.eval_split


def carve_validation(num_rows: int, percentage: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, rank-independent split of train into (train rows, held-out rows)."""
    held_out = max(1, int(round(num_rows * percentage / 100)))
    if held_out >= num_rows:
        raise UsageError(f"Cannot hold out {held_out} of {num_rows} rows for evaluation; lower "
                         "--validation_split_percentage.")
    permutation = np.random.default_rng(seed).permutation(num_rows)
    return np.sort(permutation[held_out:]), np.sort(permutation[:held_out])


def cut_rows(row_indices: np.ndarray, limit: Optional[int], selection: str, seed: int) -> np.ndarray:
    if limit is None or limit >= len(row_indices):
        return row_indices
    if selection == "random":
        return np.sort(np.random.default_rng(seed).choice(row_indices, size=limit, replace=False))
    return row_indices[:limit]


@dataclass(eq=False)
class IndexedRows(torch.utils.data.Dataset):
    """One split, read row by row on demand; each item carries the split name and its row index in that split."""
    dataset: datasets.Dataset
    split: str
    row_indices: np.ndarray
    token_lengths: Optional[np.ndarray] = None  # the rows' lengths in tokens, once the validation pass measured them
    image_sequences: Optional[np.ndarray] = None  # and their image sequences (images and --pan_and_scan crops)
    packs: Optional[list[np.ndarray]] = None  # with --packing: each pack's rows, as positions in this split

    def __len__(self) -> int:
        return len(self.row_indices)

    def __getitem__(self, position: int) -> dict:
        row_index = int(self.row_indices[position])
        return {"row": self.dataset[row_index], "split": self.split, "row_index": row_index}

    def loss_batches_source(self) -> torch.utils.data.Dataset:
        """What the trainer batches for training and loss evaluation: the packs with --packing, else the rows."""
        return self if self.packs is None else PackedRows(self)


@dataclass(eq=False)
class PackedRows(torch.utils.data.Dataset):
    """A split's packs as dataset items (each a list of its rows' items), so that the trainer's own samplers shuffle,
    share out across ranks and resume packs as they do rows."""
    rows: IndexedRows

    @property
    def split(self) -> str:
        return self.rows.split

    @property
    def row_indices(self) -> np.ndarray:
        return self.rows.row_indices

    def __len__(self) -> int:
        return len(self.rows.packs)

    def __getitem__(self, position: int) -> list[dict]:
        return [self.rows[int(row)] for row in self.rows.packs[position]]


def without_image_decoding(dataset: datasets.Dataset) -> datasets.Dataset:
    """The split with decoding switched off on its image columns (see `undecoded`). Column by column: on an Image
    column cast_column only swaps the feature, whereas Dataset.cast copies every row of every column to a cache file."""
    for column, feature in dataset.features.items():
        if undecoded(feature) != feature:
            dataset = dataset.cast_column(column, undecoded(feature))
    return dataset


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


# ---------------------------------------------------------------------------------------------------
# Data: schemas and the canonical chat row
# ---------------------------------------------------------------------------------------------------


def detect_schema(columns: list[str], data_args: DataArguments) -> DatasetSchema:
    """Work out the dataset's layout from its column names; explicit column flags win over detection."""
    found = f"Dataset '{data_args.dataset_name}' has columns {columns}"

    def pick(flag: str, candidates: tuple) -> Optional[str]:
        explicit = getattr(data_args, flag)
        if explicit is not None and explicit not in columns:
            raise UsageError(f"--{flag} {explicit}: no such column. {found}.")
        return explicit if explicit is not None else next((c for c in candidates if c in columns), None)
    image_column = pick("image_column", IMAGE_COLUMNS)
    if image_column is None:
        raise UsageError(f"{found} but none holds images (looked for {list(IMAGE_COLUMNS)}). Set --image_column.")
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
    raise UsageError(f"{found}: cannot tell the question and answer apart (looked for questions in "
                     f"{list(QUESTION_COLUMNS)}, answers in {list(ANSWER_COLUMNS)}, chats in "
                     f"{list(CONVERSATION_COLUMNS)}). Set {missing}, or --messages_column for chat data.")


@dataclass(frozen=True)
class DatasetSchema:
    kind: str  # "question_answer", "caption" or "conversation"
    image_column: str
    text_column: Optional[str] = None  # the question, or None for captions and conversations
    target_column: Optional[str] = None  # the answer, the caption, or the conversation


# Column names detect_schema looks for, in order.
IMAGE_COLUMNS = ("image", "images")
QUESTION_COLUMNS = ("query", "question")
ANSWER_COLUMNS = ("label", "answer", "answers")
CONVERSATION_COLUMNS = ("messages", "conversations")
CAPTION_COLUMNS = ("caption", "text")


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
    elif not images:
        raise InvalidRowError("image_missing", f"column '{schema.image_column}' is empty")
    else:
        if schema.kind == "caption":
            question = data_args.caption_instruction
        else:
            question = row.get(schema.text_column)
            if not isinstance(question, str) or not question.strip():
                raise InvalidRowError("empty_question", f"column '{schema.text_column}' is empty")
            question = data_args.question_template.format(question=question.strip())
        target, answers = choose_answer(row.get(schema.target_column))
        messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [text_part(question)]},
                    {"role": "assistant", "content": [text_part(target)]}]
    if data_args.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [text_part(data_args.system_prompt)]})
    return {"images": images, "messages": messages, "answers": answers}


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
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


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
        pieces = re.split(f"({re.escape(image_placeholder)})", content)  # the placeholders kept, as pieces
        parts = [{"type": "image"} if p == image_placeholder else text_part(p.strip()) for p in pieces if p.strip()]
    elif isinstance(content, list) and all(isinstance(part, dict) for part in content):
        # Arrow gives every part every key of the column, so a part's "text" may be None: that is no text.
        parts = [{"type": "image"} if part.get("type") == "image" else text_part(str(part.get("text") or "").strip())
                 for part in content]
    else:
        raise InvalidRowError("bad_conversation",
                              f"{role} message content must be text or a list of part dicts, got {content!r:.100}")
    return {"role": role, "content": parts}


def check_conversation(messages: list[dict], num_images: int) -> None:
    placeholders = sum(part["type"] == "image" for m in messages for part in m["content"])
    if placeholders != num_images:
        raise InvalidRowError("image_count_mismatch", f"{placeholders} image placeholders but {num_images} images")
    if next((m["role"] for m in messages if m["role"] != "system"), None) == "assistant":
        # Templates disagree on such chats (Gemma 3's rejects them, others index past the start): one answer for all.
        raise InvalidRowError("bad_conversation",
                              "the conversation starts with an assistant turn, before any user turn")
    assistant_turns = [m["content"] for m in messages if m["role"] == "assistant"]
    if not assistant_turns:
        raise InvalidRowError("no_assistant_turn", "the conversation has no assistant message")
    # Checked per turn: an empty turn next to a good one would otherwise train an empty answer.
    if any(not parts or any(p["type"] != "text" or not p["text"] for p in parts) for parts in assistant_turns):
        raise InvalidRowError("empty_answer", "an assistant message is empty or holds an image")


# ---------------------------------------------------------------------------------------------------
# Data: images
# ---------------------------------------------------------------------------------------------------

# What a bad image raises. DecompressionBombError (past Pillow's pixel limit) is no OSError; without it here one
# giant image would end the run even with --invalid_rows skip.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_image(value: Any, base_dir: Optional[Path]) -> Image.Image:
    """Decode a PIL image, bytes, {"bytes", "path"} dict or file path (relative to the dataset) as upright RGB.
    datasets.Image decodes and applies the EXIF orientation; what this adds: paths relative to the dataset, a bad or
    missing image as a bad row (not a crash), and `to_rgb`."""
    source = image_source(value, base_dir)
    try:
        if isinstance(source, Image.Image):
            return to_rgb(ImageOps.exif_transpose(source))
        encoded = {"bytes": source, "path": None} if isinstance(source, bytes) else {"bytes": None, "path": source}
        return to_rgb(datasets.Image().decode_example(encoded))
    except IMAGE_ERRORS as e:
        raise InvalidRowError("image_unreadable", f"cannot decode image: {e}") from e


def image_size(value: Any, base_dir: Optional[Path]) -> tuple[int, int]:
    """(height, width) of the image `open_image` would return, from the file's header: no pixel is decoded, so what
    only decoding finds (truncated pixel data) is left to open_image, per batch."""
    source = image_source(value, base_dir)
    try:
        opened = source if isinstance(source, Image.Image) else Image.open(
            io.BytesIO(source) if isinstance(source, bytes) else source)
        with contextlib.nullcontext(opened) if opened is source else opened as image:
            width, height = image.size
            # The EXIF orientation open_image applies, read only where the header holds it: a PNG's getexif()
            # decodes the whole image to look behind its pixel data (PIL/PngImagePlugin.py:1117-1121).
            if "exif" in image.info and image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):
                width, height = height, width
            return height, width
    except IMAGE_ERRORS as e:
        raise InvalidRowError("image_unreadable", f"cannot read the image header: {e}") from e


def image_source(value: Any, base_dir: Optional[Path]):
    """A row's image as a PIL image, encoded bytes or the path of an existing file; a bad row when there is none."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (Image.Image, bytes, bytearray)):
        return bytes(value) if isinstance(value, bytearray) else value
    if isinstance(value, str) and value:
        path = image_path(value, base_dir)
        if not path.is_file():
            raise InvalidRowError("image_missing", f"image file {str(path)!r} does not exist")
        return str(path)
    raise InvalidRowError("image_missing", f"no image in the row (got {type(value).__name__})")


def image_path(name: str, base_dir: Optional[Path]) -> Path:
    """An image file named in a row: relative to the dataset's folder, where it has one; an absolute name as is."""
    return Path(name) if base_dir is None else Path(base_dir, name)


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
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return convert_to_rgb(image)


# ---------------------------------------------------------------------------------------------------
# Data: skipped and truncated rows
# ---------------------------------------------------------------------------------------------------


class SkippedRows:
    """What --invalid_rows does with a bad row, and the record of skipped and truncated rows. Each process (dataloader
    workers and ranks included) appends to its own JSON-lines file under `<output_dir>/skipped_rows.parts`;
    `write_report` merges them into `skipped_rows.json`."""

    def __init__(self, output_dir: Optional[str], invalid_rows: str = "error"):
        self.parts_dir = Path(output_dir, "skipped_rows.parts") if output_dir else None
        self.invalid_rows = invalid_rows

    @classmethod
    def for_run(cls, training_args, invalid_rows: str) -> SkippedRows:
        """The run's record; a training that does not resume starts it empty (evaluation adds to it)."""
        skipped_rows = cls(training_args.output_dir, invalid_rows)
        if training_args.should_save and training_args.do_train and training_args.resume_from_checkpoint is None:
            skipped_rows.clear()
        return skipped_rows

    def reject(self, feature: dict, error: InvalidRowError, action: str = "skipped") -> None:
        """A bad row stops the run (--invalid_rows error) or is recorded and dropped; a truncated one is recorded."""
        if action == "skipped" and self.invalid_rows == "error":
            where = f"{feature['split']} row {feature['row_index']}"
            raise UsageError(f"Invalid {where}: {error.reason}: {error.detail}. Fix the row, or pass --invalid_rows "
                             "skip to drop such rows (they are listed in skipped_rows.json).") from error
        self.record(action, feature["split"], feature["row_index"], error.reason, error.detail)

    def record(self, action: str, split: str, row_index: int, reason: str, detail: str) -> None:
        entry = {"action": action, "split": split, "row_index": row_index, "reason": reason, "detail": detail}
        if self.parts_dir is not None:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            with open(self.parts_dir / f"pid{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def clear(self) -> None:
        for part in self.parts_dir.glob("*.jsonl") if self.parts_dir is not None else ():
            part.unlink()

    def entries(self) -> list[dict]:
        unique = {}
        for part in sorted(self.parts_dir.glob("*.jsonl")) if self.parts_dir is not None else ():
            for line in part.read_text().splitlines():
                entry = json.loads(line)
                unique[(entry["action"], entry["split"], entry["row_index"])] = entry
        return sorted(unique.values(), key=lambda e: (e["action"], e["split"], e["row_index"]))

    def write_report(self, output_dir: str) -> dict:
        """Write skipped_rows.json; return {action: {reason: count}} for logging."""
        entries = self.entries()
        counts = {action: dict(collections.Counter(e["reason"] for e in entries if e["action"] == action))
                  for action in ("skipped", "truncated")}
        report = {"skipped_by_reason": counts["skipped"], "truncated_by_reason": counts["truncated"], "rows": entries}
        with open(Path(output_dir, "skipped_rows.json"), "w") as f:
            json.dump(report, f, indent=2)
        return counts


# ---------------------------------------------------------------------------------------------------
# Data: validation pass
# ---------------------------------------------------------------------------------------------------


def validate_rows(encoder: ChatEncoder, splits: dict, skipped_rows: SkippedRows, training_args,
                  cache_dir: Optional[str] = None) -> dict:
    """--validate_rows full: before the model loads, check every selected row as the collator encodes it (image headers,
    no pixels; cached by the rows' fingerprint) and report all bad rows at once: --invalid_rows error stops; skip drops
    them from the row index (so epochs, max_steps and rank shares count good rows only) and lists them in
    skipped_rows.json. Returns the splits with their rows' token lengths and image sequences."""
    if encoder.data_args.validate_rows == "none":
        return splits
    cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE, "run_lora_vlm_row_checks")
    # The first process checks and caches; the others read its results, so every rank drops the same rows.
    with training_args.main_process_first(desc="checking every row"):
        checked = {name: check_split(encoder, rows, cache) for name, rows in splits.items()}
    valid, bad_rows = {}, []
    for name, rows in splits.items():
        reasons = np.asarray(checked[name]["reason"], dtype=object)
        good = reasons == ""
        if not good.all():
            details = checked[name]["detail"]
            bad_rows += [(rows.split, int(rows.row_indices[i]), reasons[i], details[i]) for i in np.flatnonzero(~good)]
        lengths, sequences = (np.asarray(checked[name][column])[good] for column in ("length", "image_sequences"))
        valid[name] = IndexedRows(rows.dataset, rows.split, rows.row_indices[good], lengths, sequences)
    total = sum(len(rows) for rows in splits.values())
    if not bad_rows:
        logger.info(f"Checked {total} rows: all valid.")
        return valid
    summary = describe_bad_rows(bad_rows, total)
    if encoder.data_args.invalid_rows == "error":
        raise UsageError(f"{summary}. Fix these rows, or pass --invalid_rows skip to drop them (they are then listed "
                         "in skipped_rows.json).")
    logger.warning(f"{summary}. They are dropped (--invalid_rows skip) and listed in skipped_rows.json.")
    if training_args.should_save:  # one record for the run, not one per rank
        for split, row_index, reason, detail in bad_rows:
            skipped_rows.record("skipped", split, row_index, reason, detail)
    emptied = [rows.split for name, rows in valid.items() if len(rows) == 0 < len(splits[name])]
    if emptied:
        raise UsageError(f"No valid row is left in {emptied}: {summary}.")
    return valid


def describe_bad_rows(bad_rows: list[tuple], total: int) -> str:
    """One line: per reason, how many rows, the first of them and one's detail, most frequent reason first."""
    by_reason = collections.defaultdict(list)
    for entry in bad_rows:
        by_reason[entry[2]].append(entry)
    parts = []
    for reason, entries in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        first = ", ".join([f"{split} row {index}" for split, index, _, _ in entries[:5]] + ["..."] * (len(entries) > 5))
        parts.append(f"{reason} x{len(entries)} ({first}; e.g. {' '.join(entries[0][3].split()):.150})")
    return f"{len(bad_rows)} of {total} rows are invalid: " + "; ".join(parts)


ROW_CHECK_FEATURES = datasets.Features({"reason": datasets.Value("string"), "detail": datasets.Value("string"),
                                        "length": datasets.Value("int32"), "image_sequences": datasets.Value("int32")})
# Flags that change nothing a row check finds; a rerun that changes only them (say, to --invalid_rows skip after an
# error report) reads the cached checks.
ROW_CHECK_UNUSED_FLAGS = ("padding_strategy", "length_buckets", "invalid_rows", "validate_rows")
ROWS_PER_CHECK_PROCESS = 1000
MAX_CHECK_PROCESSES = 8


def check_split(encoder: ChatEncoder, rows: IndexedRows, cache: Path) -> datasets.Dataset:
    """RowChecker over one split's selected rows by datasets.map: in parallel when there are many, and cached under a
    fingerprint of everything the checks depend on."""
    schema = encoder.schema
    columns = [c for c in (schema.image_column, schema.text_column, schema.target_column) if c]
    selected = rows.dataset.select(rows.row_indices).select_columns(columns)
    if len(selected) == 0:
        return datasets.Dataset.from_dict({name: [] for name in ROW_CHECK_FEATURES}, features=ROW_CHECK_FEATURES)
    fingerprint = row_check_fingerprint(encoder, selected)
    processes = min(cores_of_this_rank(), len(selected) // ROWS_PER_CHECK_PROCESS, MAX_CHECK_PROCESSES)
    caching = datasets.is_caching_enabled()
    if caching:
        cache.mkdir(parents=True, exist_ok=True)
    # A progress bar only where the check takes long enough to watch.
    quiet = len(selected) < ROWS_PER_CHECK_PROCESS and not datasets.utils.are_progress_bars_disabled()
    if quiet:
        datasets.utils.disable_progress_bars()
    try:
        return selected.map(
            RowChecker(encoder), batched=True, remove_columns=columns, features=ROW_CHECK_FEATURES,
            num_proc=processes if processes > 1 else None, new_fingerprint=fingerprint, keep_in_memory=not caching,
            cache_file_name=str(cache / f"{fingerprint}.arrow") if caching else None,
            desc=f"Checking {rows.split} rows")
    finally:
        if quiet:
            datasets.utils.enable_progress_bars()


def row_check_fingerprint(encoder: ChatEncoder, selected: datasets.Dataset) -> str:
    """What a split's checks depend on: its rows, this script, the processor, the data flags, and the size and time
    of every image file the rows name rather than embed (an edited file is checked anew)."""
    flags = {k: v for k, v in dataclasses.asdict(encoder.data_args).items() if k not in ROW_CHECK_UNUSED_FLAGS}
    # A call's padding settings stay on a fast tokenizer, and so in its hash, until a plain call resets them
    # (transformers/tokenization_utils_fast.py:473-497).
    encoder.tokenizer("")
    image_column = selected.with_format("arrow")[encoder.schema.image_column]  # arrow: the selected rows, undecoded
    files = [name for chunk in image_column.chunks for name in named_files(chunk)]
    return Hasher.hash([
        selected._fingerprint, script_digest(), encoder.processor, encoder.family, encoder.schema, flags,
        encoder.image_kwargs, str(encoder.image_base_dir), [file_stamp(name, encoder.image_base_dir) for name in files],
    ])


@functools.cache
def script_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def named_files(array: pa.Array) -> list[str]:
    """The file names in an image column: strings, datasets.Image's {bytes, path} structs, or lists of either."""
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return named_files(array.flatten())
    if pa.types.is_struct(kind) and kind.get_field_index("path") >= 0 and kind.get_field_index("bytes") >= 0:
        # A path beside embedded bytes is only a name.
        return named_files(array.field("path").filter(array.field("bytes").is_null()))
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return []
    return [name for name in array.to_pylist() if name]


def file_stamp(name: str, base_dir: Optional[Path]) -> tuple:
    try:
        stat = image_path(name, base_dir).stat()
        return name, stat.st_size, stat.st_mtime_ns
    except OSError:
        return name, None


class RowChecker:
    """The datasets.map function of the validation pass: per row, the canonical chat and its texts
    (ChatEncoder.rendered_chat), each image's header, and the length in tokens (the chat tokenized with one image token
    per image, plus each image's other tokens). Returns each row's reason and detail ("" if valid), its length, and its
    image sequences (each image's and its crops': the pixel_values rows it brings where images have one fixed size)."""

    def __init__(self, encoder: ChatEncoder):
        self.encoder = encoder
        self.image_tokens = {}  # (height, width) -> what `count` says of an image of that size, or its InvalidRowError

    def __call__(self, batch: dict) -> dict:
        encoder = self.encoder
        size = len(next(iter(batch.values())))
        result = {"reason": [""] * size, "detail": [""] * size, "length": [0] * size, "image_sequences": [0] * size}
        measured = []
        for position in range(size):
            try:
                example, text, spans = encoder.rendered_chat({column: batch[column][position] for column in batch})
                images = [self.count(image_size(image, encoder.image_base_dir)) for image in example["images"]]
                measured.append((position, text, spans, images))
            except InvalidRowError as e:
                result["reason"][position], result["detail"][position] = e.reason, e.detail
        if not measured:
            return result
        texts = []
        for _, text, _, images in measured:
            # Each placeholder (there is one per image) becomes its image's text with one token per image sequence.
            pieces = text.split(encoder.placeholder)
            if len(pieces) != len(images) + 1:
                raise RuntimeError(f"{len(pieces) - 1} image placeholders for {len(images)} images in {text!r:.200}")
            texts.append(pieces[0] + "".join(short + piece for (_, short), piece in zip(images, pieces[1:])))
        bos = encoder.tokenizer_adds_bos(texts[0])
        encoded = encoder.tokenizer(texts, add_special_tokens=bos, return_offsets_mapping=True)
        for (position, text, spans, images), ids, offsets in zip(measured, encoded.input_ids, encoded.offset_mapping):
            try:
                result["length"][position] = self.length(text, spans, images, np.asarray(ids), offsets)
                result["image_sequences"][position] = sum(len(sequences) for sequences, _ in images)
            except InvalidRowError as e:
                result["reason"][position], result["detail"][position] = e.reason, e.detail
        return result

    def count(self, size: tuple[int, int]) -> tuple[list[int], str]:
        """(the image tokens of each image sequence of an image of `size` (height, width, before --fixed_image_size):
        the image's, then one per --pan_and_scan crop; the text standing for the image in the checked chat, one image
        token per sequence). Tokens from the processor's own arithmetic where it has one (no pixels; e.g.
        transformers/models/qwen2_5_vl/processing_qwen2_5_vl.py:205, llava_next/processing_llava_next.py:228,
        gemma3/processing_gemma3.py:154, which counts no crops (:169): ChatEncoder.image_crops does, from the size),
        else from a blank image's tokens."""
        encoder, processor = self.encoder, self.encoder.processor
        size = tuple(encoder.data_args.fixed_image_size or size)
        if size not in self.image_tokens:
            try:
                if hasattr(processor, "_get_num_multimodal_tokens"):
                    counted = processor._get_num_multimodal_tokens(image_sizes=[size], **encoder.image_kwargs)
                    count = counted["num_image_tokens"][0]
                else:
                    processed = encoder.process([encoder.placeholder], [[Image.new("RGB", size[::-1])]])
                    count = encoder.family.image_token_counts(processor, processed)[0]
                if len(image_text(processor, count)) != encoder.family.expanded_length(processor, count):
                    raise RuntimeError("image_text does not expand images as MODEL_FAMILIES says for "
                                       f"{type(processor).__name__}")
                crops, short = encoder.image_crops(size), image_text(processor, 1)
                if crops:
                    short = encoder.crop_expansion(crops, size).replace(image_text(processor, count), short)
                    if short.count(processor.image_token) != 1 + crops:
                        raise RuntimeError(f"{type(processor).__name__} writes no {1 + crops} image sequences for an "
                                           f"image with {crops} crops")
                self.image_tokens[size] = ([int(count)] * (1 + crops), short)
            except (ValueError, ZeroDivisionError) as e:  # e.g. Qwen2.5-VL refuses images 200 times wider than high
                self.image_tokens[size] = InvalidRowError(
                    "processor_error", f"the processor rejects a {size[1]}x{size[0]} image: {type(e).__name__}: {e}"
                )
        if isinstance(self.image_tokens[size], InvalidRowError):
            raise self.image_tokens[size]
        return self.image_tokens[size]

    def length(self, text: str, spans: list, images: list[tuple], ids: np.ndarray, offsets) -> int:
        """The row's length once each image has all its tokens (`images`: what `count` says of each); a bad row as
        the collator's check_fits finds it."""
        encoder = self.encoder
        growths = [len(short) - len(encoder.placeholder) for _, short in images]
        trained = np.flatnonzero(encoder.labels(text, spans, growths, ids, offsets) != IGNORE_INDEX)
        counts = [count for sequences, _ in images for count in sequences]
        image_positions = np.flatnonzero(ids == encoder.image_token_id)
        if len(image_positions) != len(counts):
            raise RuntimeError(f"{len(image_positions)} image tokens for {len(counts)} image sequences in the checked "
                               f"text of {text!r:.200}")
        # Each image sequence is one token here: the rest of its tokens move every later position.
        added_before = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64) - 1)])
        length = len(ids) + int(added_before[-1])
        trained_positions = trained + added_before[np.searchsorted(image_positions, trained)]
        check_fits(length, trained_positions, encoder.data_args.max_seq_length)
        return length


def settle_length_buckets(encoder: ChatEncoder, splits: dict, training_args) -> None:
    """--padding_strategy bucket without --length_buckets: buckets from the token lengths the validation pass measured
    (every row: the largest bucket just holds the longest) or, with --validate_rows none, a seeded sample's (the largest
    is then --max_seq_length). Every rank chooses the same: same rows, same deterministic measure (ranks after the
    first read its cached checks) and an exact search; training and evaluation batches use them alike (with --packing,
    generation's prompts only)."""
    data_args = encoder.data_args
    if data_args.padding_strategy != "bucket" or data_args.length_buckets is not None:
        return
    measured = [rows.token_lengths for rows in splits.values()]
    if all(lengths is not None for lengths in measured):
        lengths, source, longest = np.concatenate(measured), "every row", None
    else:
        lengths, source = sampled_lengths(encoder, splits, training_args.seed), "a sample of rows"
        longest = data_args.max_seq_length
    if len(lengths) == 0:
        data_args.length_buckets = sorted({-(-data_args.max_seq_length * k // 4) for k in (1, 2, 3, 4)})
        return
    batch_size = (training_args.per_device_train_batch_size if "train" in splits
                  else training_args.per_device_eval_batch_size)
    buckets, padded = choose_length_buckets(lengths, data_args.max_seq_length, batch_size, longest=longest)
    data_args.length_buckets = buckets
    mean = float(np.minimum(lengths, data_args.max_seq_length).mean())
    padding = 1 - mean / padded
    logger.info(f"Length buckets {buckets}, chosen from the lengths of {source} ({len(lengths)} rows "
                f"of {int(lengths.min())} to {int(lengths.max())} tokens): about {100 * padding:.1f}% "
                f"padding in batches of {batch_size}.")
    if padding > PADDING_WORTH_PACKING and longest is None and not data_args.packing:
        capped = np.minimum(lengths, data_args.max_seq_length)
        length = choose_packing_length(capped, training_args.seed)
        packed = packing_padding(pack_rows(capped, length, training_args.seed), capped, length)
        logger.info(f"--packing would leave about {100 * packed:.1f}% padding here (packs of {length} tokens).")


# Bucket padding above which the start-up log says what --packing would leave instead.
PADDING_WORTH_PACKING = 0.15


ROWS_SAMPLED_FOR_BUCKETS = 1000


def sampled_lengths(encoder: ChatEncoder, splits: dict, seed: int) -> np.ndarray:
    """Token lengths of a seeded sample of the splits' rows (the valid ones), measured as the validation pass does."""
    pooled = [(rows, position) for rows in splits.values() for position in range(len(rows))]
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(pooled), size=min(len(pooled), ROWS_SAMPLED_FOR_BUCKETS), replace=False))
    checker, lengths = RowChecker(encoder), []
    for rows, positions in itertools.groupby((pooled[i] for i in picked), key=lambda pair: pair[0]):
        checked = checker(rows.dataset[[int(rows.row_indices[position]) for _, position in positions]])
        lengths += [length for length, reason in zip(checked["length"], checked["reason"]) if not reason]
    return np.asarray(lengths, dtype=np.int64)


def choose_length_buckets(lengths, max_seq_length: int, batch_size: int, max_buckets: int = 4, multiple: int = 16,
                          longest: Optional[int] = None) -> tuple[list[int], float]:
    """At most `max_buckets` lengths, multiples of `multiple` (or max_seq_length), the largest `longest` or else
    holding the longest row, that minimize a random batch's expected padded length; returns them and that length.

    A batch of `batch_size` rows pads to the smallest bucket holding its longest row, which has at most L tokens with
    probability F(L)**batch_size (F: share of rows of at most L tokens); that expectation is a sum over consecutive
    buckets, so dynamic programming over the candidate lengths finds the best buckets exactly."""
    lengths = np.sort(np.minimum(np.asarray(lengths, dtype=np.int64), max_seq_length))
    candidates = np.unique(np.minimum(-(-lengths // multiple) * multiple, max_seq_length))
    if longest is not None:
        candidates = np.union1d(candidates[candidates < longest], [longest])
    holds = (np.searchsorted(lengths, candidates, side="right") / len(lengths)) ** batch_size
    # cost[j]: the least expected padded length of the batches that candidates[j], the largest bucket so far, holds.
    cost, backs = candidates * holds, []
    best_cost, best_count = cost[-1], 1
    for _ in range(max_buckets - 1):
        # added[j, i]: buckets up to candidates[i], then one more at candidates[j] for the batches in between.
        added = cost[None, :] + candidates[:, None] * (holds[:, None] - holds[None, :])
        added[np.triu_indices(len(candidates))] = np.inf
        backs.append(added.argmin(axis=1))
        cost = added[np.arange(len(candidates)), backs[-1]]
        if cost[-1] < best_cost:  # strictly: a bucket more must pay for itself
            best_cost, best_count = cost[-1], len(backs) + 1
    chosen = [len(candidates) - 1]
    for back in reversed(backs[:best_count - 1]):
        chosen.append(int(back[chosen[-1]]))
    return sorted(int(candidates[j]) for j in chosen), float(best_cost)


def settle_packs(encoder: ChatEncoder, splits: dict, training_args) -> None:
    """--packing: every split's packs, from the token lengths the validation pass measured (cut to --max_seq_length,
    as the collator cuts rows), all of one length: --packing_length, else choose_packing_length's for the training
    rows (so that a rerun evaluating more or other rows packs the training rows as before, unless an evaluation row
    is longer than the length chosen for them), raised if need be to hold the longest row of any split. Every rank
    builds the same packs (same lengths, same seed)."""
    data_args, seed = encoder.data_args, training_args.seed
    if not data_args.packing:
        return
    on_gaudi = getattr(training_args, "use_habana", False) and not training_args.use_cpu
    if on_gaudi and not encoder.family.packs_on_gaudi:
        raise UsageError("--packing on Gaudi keeps a pack's rows apart for Gemma 3 only; optimum-habana's port of "
                         "this model attends over the whole pack: drop --packing.")
    capped = {name: np.minimum(rows.token_lengths, data_args.max_seq_length) for name, rows in splits.items()}
    pooled = np.concatenate(list(capped.values()))
    if len(pooled) == 0:
        return
    longest = int(pooled.max())
    if data_args.packing_length is None:
        chosen = choose_packing_length(capped["train"] if len(capped.get("train", ())) else pooled, seed)
        data_args.packing_length = max(chosen, -(-longest // 16) * 16)
    elif data_args.packing_length < longest:
        raise UsageError(f"--packing_length {data_args.packing_length} is shorter than the longest row ({longest} "
                         "tokens), and a row is never split: raise it, or lower --max_seq_length.")
    length, described = data_args.packing_length, []
    for name, rows in splits.items():
        rows.packs = pack_rows(capped[name], length, seed)
        padding = packing_padding(rows.packs, capped[name], length)
        described.append(f"{rows.split}: {len(rows)} rows in {len(rows.packs)} packs, {100 * padding:.1f}% padding")
    logger.info(f"Packs of {length} tokens ({'; '.join(described)}).")


# Rows per shuffled window packed best-fit-decreasing: larger windows pack tighter, smaller keep the order more random.
PACKING_WINDOW = 1024
# choose_packing_length: the padding a pack length should leave at most; the longest pack it tries, in multiples of
# the shortest holding the longest row (attention's cost grows with the pack's square).
PACKING_PADDING_TARGET = 0.03
PACKING_MAX_LENGTH_FACTOR = 4


def choose_packing_length(lengths: np.ndarray, seed: int, multiple: int = 16, tries: int = 64) -> int:
    """The pack length: the shortest multiple of `multiple` holding the longest row, up to PACKING_MAX_LENGTH_FACTOR
    times that, whose packs leave at most PACKING_PADDING_TARGET padding; else the one leaving least (the shorter of
    equals). Longer packs pack tighter but attend over more tokens, hence the shortest.

    Every multiple is a candidate: with few rows per window the padding rises and falls with the length (a window's
    last pack is only part full), so a short list of lengths can miss every low point. A lower bound on each length's
    packs (per window: as many as its tokens fill, and no fewer than its rows over half the length, which cannot share
    a pack) skips the lengths that cannot meet the target or beat the best found; at most `tries` lengths are packed."""
    lengths = np.asarray(lengths, dtype=np.int64)
    shortest = -(-int(lengths.max()) // multiple) * multiple
    candidates = np.arange(shortest, shortest * PACKING_MAX_LENGTH_FACTOR + 1, multiple, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(lengths))  # pack_rows' windows
    fewest = np.zeros(len(candidates), dtype=np.int64)
    for start in range(0, len(order), PACKING_WINDOW):
        window = np.sort(lengths[order[start:start + PACKING_WINDOW]])
        over_half = len(window) - np.searchsorted(window, candidates // 2, side="right")
        fewest += np.maximum(-(-int(window.sum()) // candidates), over_half)
    least = 1 - float(lengths.sum()) / (candidates * fewest)  # no pack length leaves less padding than this
    padding = {}

    def pack(i: int) -> float:
        length = int(candidates[i])
        padding[length] = packing_padding(pack_rows(lengths, length, seed), lengths, length)
        return padding[length]

    for i in np.flatnonzero(least <= PACKING_PADDING_TARGET)[:tries]:  # shortest first
        if pack(i) <= PACKING_PADDING_TARGET:
            return int(candidates[i])
    for i in np.argsort(least, kind="stable"):  # none within the target: least padding, lowest bound first
        if padding and (least[i] >= min(padding.values()) or len(padding) >= tries):
            break
        if int(candidates[i]) not in padding:
            pack(i)
    return min(padding, key=lambda length: (padding[length], length))


def pack_rows(lengths: np.ndarray, length: int, seed: int, window: int = PACKING_WINDOW) -> list[np.ndarray]:
    """Packs of whole rows (positions into `lengths`) of at most `length` tokens: the rows in a seeded random order,
    cut into windows, each window's rows packed best-fit-decreasing (longest first, each into the fullest pack it fits).
    What this adds to a plain first-fit: tighter packs, and no pack mixing rows from far apart in the shuffled order."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    packs = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        free, members = [], []  # free: (room left, pack number), sorted
        for position in chunk:
            need = int(lengths[position])
            fit = bisect.bisect_left(free, (need, -1))
            if fit == len(free):
                members.append([int(position)])
                bisect.insort(free, (length - need, len(members) - 1))
            else:
                room, number = free.pop(fit)
                members[number].append(int(position))
                bisect.insort(free, (room - need, number))
        packs += [np.asarray(rows, dtype=np.int64) for rows in members]
    return packs


def packing_padding(packs: list[np.ndarray], lengths: np.ndarray, length: int) -> float:
    """The share of the packs' tokens that is padding."""
    return 1 - float(sum(int(lengths[pack].sum()) for pack in packs)) / (len(packs) * length) if packs else 0.0


def image_text(processor, count: int) -> str:
    """What the processor writes in place of an image placeholder, for an image of `count` tokens: `count` image
    tokens, which Gemma 3 wraps in its full_image_sequence (newlines and begin/end-of-image markers)."""
    full = getattr(processor, "full_image_sequence", None)
    if full is None:
        return processor.image_token * count
    return full.replace(processor.image_token * processor.image_seq_length, processor.image_token * count)


# ---------------------------------------------------------------------------------------------------
# Encoding: chat rendering, assistant spans and labels
# ---------------------------------------------------------------------------------------------------


def apply_pan_and_scan(processor, family: ModelFamily, data_args: DataArguments) -> dict:
    """The processor arguments of --pan_and_scan and its settings (each defaulting to the processor's own), also
    written into `processor`; {} without --pan_and_scan."""
    if not data_args.pan_and_scan:
        return {}
    if family.pan_and_scan_kwargs is None:
        raise UsageError(f"--pan_and_scan applies to Gemma 3 only; {type(processor).__name__} cuts no crops.")
    defaults = processor_call_defaults(processor)["images_kwargs"]
    settings = {}
    for flag, name in zip(PAN_AND_SCAN_FLAGS, family.pan_and_scan_kwargs):
        value = getattr(data_args, flag)
        if value is None:
            value = defaults.get(name, getattr(processor.image_processor, name, None))
        if value is None:
            raise UsageError(f"--{flag}: this model's processor sets no default; give one.")
        settings[name] = value
    # Saved with the processor (checkpoints, the merged model), so that a model served from them crops as it was
    # trained: as the image processor's settings, for a server calling it alone, and as the tokenizer's init kwargs,
    # which a processor call takes over its own defaults (processing_utils.py ProcessorMixin._merge_kwargs; Gemma 3's
    # default is no pan-and-scan, processing_gemma3.py:43-49, whatever the image processor says).
    for name, value in settings.items():
        setattr(processor.image_processor, name, value)
        processor.tokenizer.init_kwargs[name] = value
    return settings


def processor_call_defaults(processor) -> dict:
    """{modality: arguments} a processor call uses when given none: its kwargs class's defaults (Gemma 3's:
    processing_gemma3.py:38-50), which win over the image processor's own settings, updated by the tokenizer's init
    kwargs (transformers/processing_utils.py ProcessorMixin._merge_kwargs)."""
    import inspect
    import typing

    call_kwargs = inspect.signature(type(processor).__call__).parameters.get("kwargs")
    kwargs_class = next(iter(typing.get_args(call_kwargs.annotation)), None) if call_kwargs is not None else None
    if kwargs_class is None or not hasattr(kwargs_class, "_defaults"):
        return {"images_kwargs": {}}
    return processor._merge_kwargs(kwargs_class, tokenizer_init_kwargs=processor.tokenizer.init_kwargs)


class ChatEncoder:
    """Turns dataset rows into token ids: the one owner of chat rendering and processor calls, for the training
    collator and the generation evaluator alike. A row becomes the canonical chat rendered by the model's own template
    (with its assistant spans); a batch is one processor call."""

    def __init__(self, processor, family: ModelFamily, schema: DatasetSchema, data_args: DataArguments,
                 image_base_dir: Optional[Path] = None):
        self.processor = processor
        self.family = family
        self.schema = schema
        self.data_args = data_args
        self.image_base_dir = image_base_dir
        self.tokenizer = processor.tokenizer
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.placeholder = family.image_placeholder(processor)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.image_kwargs = dict(family.processor_call_kwargs)
        budget = (data_args.image_min_pixels, data_args.image_max_pixels)
        if budget != (None, None):
            if family.pixel_budget_kwargs is None:
                raise UsageError("--image_min_pixels / --image_max_pixels apply to dynamic-resolution families "
                                 "(qwen2_5_vl).")
            self.image_kwargs.update({k: v for k, v in zip(family.pixel_budget_kwargs, budget) if v is not None})
        self.crop_settings = apply_pan_and_scan(processor, family, data_args)  # {} without --pan_and_scan
        self.image_kwargs.update(self.crop_settings)
        self.crop_expansions = {}  # number of crops -> what the processor writes for an image with that many
        self.pixel_row_shape = None  # one image's pixel_values row, read from the processor on first use
        # What a row's text must not hold: strings the processor reads as an image, and the tokenizer's markup
        # (<bos>, <eos>, <pad>, <unk> and the special tokens the chat template writes, e.g. <end_of_turn>). Other
        # special tokens are text a row may train on, e.g. Qwen2.5-VL's <|box_start|> in grounding data.
        markers = [getattr(processor, f"{kind}_token", None) for kind in ("image", "boi", "eoi", "video")]
        self.image_markers = {marker for marker in [self.placeholder, *markers] if marker}
        tokenizer = self.tokenizer
        sample = processor.apply_chat_template(SAMPLE_CHAT, tokenize=False)
        markup = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token}
        markup |= {token for token in tokenizer.all_special_tokens if token in sample}
        reserved = sorted((self.image_markers | markup) - {None, ""}, key=len, reverse=True)
        self.reserved_text = re.compile("|".join(map(re.escape, reserved)))

    def training_chat(self, row: dict) -> tuple[str, list, list]:
        """(rendered chat, assistant spans in characters, decoded images) of one dataset row."""
        example, text, spans = self.rendered_chat(row)
        return text, spans, [self.open_image(image) for image in example["images"]]

    def rendered_chat(self, row: dict) -> tuple[dict, str, list]:
        """(canonical row, rendered chat, assistant spans in characters) of one dataset row; no image is read."""
        example = self.canonical_row(row)
        with self.template_errors_as_bad_rows():
            text, spans = render_with_assistant_spans(self.processor, example["messages"])
        return example, text, spans

    def canonical_row(self, row: dict) -> dict:
        """normalize_row, refusing text holding an image placeholder or special token (read as an image or markup)."""
        example = normalize_row(row, self.schema, self.data_args)
        for message in example["messages"]:
            for part in message["content"]:
                found = part["type"] == "text" and self.reserved_text.search(part["text"])
                if found:
                    kind, reads = "image_placeholder", "processor reads as an image"
                    if found.group() not in self.image_markers:
                        kind, reads = "special_token", "tokenizer reads as markup"
                    raise InvalidRowError(f"{kind}_in_text", f"the {message['role']} text holds {found.group()!r}, "
                                          f"which this model's {reads}")
        return example

    @staticmethod
    @contextlib.contextmanager
    def template_errors_as_bad_rows():
        """Whatever the chat template raises on one row's chat (its own checks, e.g. roles that do not alternate,
        or an IndexError) makes the row a bad one; an unsupported template (UsageError) stays the user's error."""
        try:
            yield
        except UsageError:
            raise
        except Exception as e:
            raise InvalidRowError("bad_conversation", f"the chat template rejected it: {type(e).__name__}: {e}") from e

    def generation_prompt(self, row: dict) -> tuple[str, list, list[str], str]:
        """(prompt up to the last assistant turn, decoded images, gold answers, question text) of one row."""
        example = self.canonical_row(row)
        messages = example["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        golds = example["answers"] if self.schema.kind != "conversation" else [messages[last]["content"][0]["text"]]
        question = " ".join(p["text"] for p in messages[last - 1]["content"] if p["type"] == "text")
        images = [self.open_image(image) for image in example["images"]]
        with self.template_errors_as_bad_rows():
            text = self.processor.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return text, images, golds, question

    def open_image(self, value) -> Image.Image:
        image = open_image(value, self.image_base_dir)
        if self.data_args.fixed_image_size:
            height, width = self.data_args.fixed_image_size
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        return image

    def process(self, texts: list[str], images: list[list], padding_side: str = "right", **kwargs):
        """The processor call: texts and their images, <bos> added only where the chat template did not write it."""
        with_images = any(images)
        if with_images and not all(images):
            return self.process_mixed(texts, images, padding_side, **kwargs)
        return self.processor(text=texts, images=images if with_images else None, padding="longest",
                              add_special_tokens=self.tokenizer_adds_bos(texts[0]), padding_side=padding_side,
                              **(self.image_kwargs if with_images else {}), **kwargs)

    def process_mixed(self, texts: list[str], images: list[list], padding_side: str, return_tensors=None, **kwargs):
        """A batch of rows with images and rows without, which processors refuse (Gemma 3's nested image lists may not
        hold an empty one, transformers 4.55.4 image_utils.py:252-288; Qwen2.5-VL's and LLaVA-NeXT's flattening
        neither, :227-250): the two groups processed apart, their rows put back in order and padded to one length.
        The images' inputs are the first group's, in the rows' order."""
        groups = [[i for i, row in enumerate(images) if row], [i for i, row in enumerate(images) if not row]]
        parts = [self.process([texts[i] for i in group], [images[i] for i in group], padding_side, **kwargs)
                 for group in groups]
        # Per row: what the text-only call returns (the tokenizer's outputs); the rest are the images' inputs.
        fill = {"input_ids": self.pad_token_id, "offset_mapping": [0, 0]}
        per_row = {key: [None] * len(texts) for key in parts[1]}
        length = max(len(part["input_ids"][0]) for part in parts)
        for group, part in zip(groups, parts):
            for key in per_row:
                for row, values in zip(group, part[key]):
                    values = [list(v) if key == "offset_mapping" else v for v in values]
                    padded = [fill.get(key, 0)] * (length - len(values))
                    per_row[key][row] = padded + values if padding_side == "left" else values + padded
        image_inputs = {key: value for key, value in parts[0].items() if key not in per_row}
        return transformers.BatchFeature({**per_row, **image_inputs}, tensor_type=return_tensors)

    def tokenizer_adds_bos(self, rendered: str) -> bool:
        """Whether the tokenizer is to add <bos>: not if the template wrote it (Gemma's does; LLaVA-NeXT's does not)."""
        bos = self.tokenizer.bos_token
        return bool(bos) and not rendered.startswith(bos)

    def image_crops(self, size: tuple[int, int]) -> int:
        """The crops --pan_and_scan adds to an image of `size` (height, width, as the processor gets it); 0 without."""
        return self.family.crop_count(self.crop_settings, tuple(size)) if self.crop_settings else 0

    def crop_expansion(self, crops: int, size: tuple[int, int]) -> str:
        """What the processor writes in place of the placeholder of an image with `crops` (> 0) crops, such as one of
        `size`: each processor words it its own way (Gemma 3: processing_gemma3.py:127-138), so it is read, once per
        number of crops, from the processor's own output for a blank image of that size."""
        if crops not in self.crop_expansions:
            blank = Image.new("RGB", (int(size[1]), int(size[0])))
            processed = self.processor(text=[self.placeholder], images=[[blank]], add_special_tokens=False,
                                       **self.image_kwargs)
            ids = [int(token) for token in processed["input_ids"][0]]
            text = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
            reencoded = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(processed["pixel_values"]) != 1 + crops or reencoded != ids:
                raise RuntimeError(f"Cannot read what {type(self.processor).__name__} writes for an image with {crops} "
                                   "crops: MODEL_FAMILIES' crop_count or the decoded text does not match it.")
            self.crop_expansions[crops] = text
        return self.crop_expansions[crops]

    def placeholder_growth(self, count: int, crops: int, size: tuple[int, int]) -> int:
        """Characters an image's placeholder gains when the processor writes its `count` tokens (and crops) in."""
        if crops:
            return len(self.crop_expansion(crops, size)) - len(self.placeholder)
        return self.family.expanded_length(self.processor, count) - len(self.placeholder)

    def encode(self, chats: list[tuple[str, list, list]]) -> tuple[list[EncodedRow], dict]:
        """Encode (text, assistant spans, images) triples in one processor call: one EncodedRow each (labels keep
        the assistant's tokens only), and the processor's output, whose per-image inputs `image_inputs` selects."""
        processed = self.process([chat[0] for chat in chats], [chat[2] for chat in chats], return_offsets_mapping=True)
        sizes = [(image.height, image.width) for chat in chats for image in chat[2]]
        crops = [self.image_crops(size) for size in sizes]
        if self.crop_settings and sizes:
            if len(processed["pixel_values"]) != len(sizes) + sum(crops):
                raise ValueError(f"The processor produced {len(processed['pixel_values'])} pixel rows for "
                                 f"{len(sizes)} images, MODEL_FAMILIES' crop_count expects {sum(crops)} crops more.")
            processed["num_crops"] = crops
        counts = self.family.image_token_counts(self.processor, processed) if sizes else []
        growths = [self.placeholder_growth(n, k, size) for n, k, size in zip(counts, crops, sizes)]
        token_type_ids = processed.get("token_type_ids")
        encoded, image_start = [], 0
        for index, (text, spans, images) in enumerate(chats):
            images_here = slice(image_start, image_start + len(images))
            image_start += len(images)
            length = int(np.sum(processed["attention_mask"][index]))
            input_ids = np.asarray(processed["input_ids"][index][:length], dtype=np.int64)
            produced = np.count_nonzero(input_ids == self.image_token_id)
            if produced != sum(counts[images_here]):
                raise ValueError(f"The processor produced {produced} image tokens, the model family table expects "
                                 f"{sum(counts[images_here])}; MODEL_FAMILIES does not match this processor.")
            offsets = processed["offset_mapping"][index][:length]
            labels = self.labels(text, spans, growths[images_here], input_ids, offsets)
            types = None if token_type_ids is None else np.asarray(token_type_ids[index][:length], dtype=np.int64)
            encoded.append(EncodedRow(input_ids, labels, types, images_here))
        return encoded, processed

    def labels(self, text: str, spans: list, growths: list[int], input_ids: np.ndarray, offsets) -> np.ndarray:
        """The labels of a tokenized chat: spans found in the rendered `text` are moved to where they sit once the k-th
        image's placeholder grew by growths[k] characters; a token is trained when it starts inside one."""
        shifted = []
        for start, end in spans:
            shift = sum(growths[: text.count(self.placeholder, 0, start)])
            shifted.append((start + shift, end + shift))
        return assistant_token_labels(input_ids, np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0], shifted)

    def processor_errors(self, chats: list[tuple[str, list, list]]) -> dict[int, InvalidRowError]:
        """After the processor rejected a batch: the rows it rejects on their own, each as a bad row."""
        errors = {}
        for index, (text, _, images) in enumerate(chats):
            try:
                self.process([text], [images])
            except Exception as e:  # StopIteration too: LLaVA-NeXT's processor raises it for a surplus <image>
                error = f"the processor rejected it: {type(e).__name__}: {e}"
                errors[index] = InvalidRowError("processor_error", error)
        return errors

    def image_inputs(self, processed: dict, kept: list[int]) -> dict:
        """The per-image model inputs of the images `kept` (rows can be dropped after processing)."""
        inputs = {}
        for key in self.family.image_inputs:
            if key == "pixel_values" and self.family.patches_per_image is not None:
                starts = np.concatenate([[0], np.cumsum(self.family.patches_per_image(processed))])
                values = np.asarray(processed[key])
                inputs[key] = torch.as_tensor(np.concatenate([values[starts[j]:starts[j + 1]] for j in kept]))
            else:
                inputs[key] = torch.as_tensor(np.stack([np.asarray(processed[key][j]) for j in kept]))
        return inputs

    def pad_images(self, batch, image_rows: int) -> None:
        """Fill the batch's pixel_values up to `image_rows` rows with blank images, appended after the real ones: the
        model gives image tokens the image features in order (a masked_scatter), so no token reads a blank one."""
        pixels = batch.get("pixel_values")
        present = 0 if pixels is None else len(pixels)
        if present > image_rows:
            raise RuntimeError(f"A batch of length {batch['input_ids'].shape[1]} has {present} pixel_values rows, more "
                               f"than the {image_rows} gaudi_image_rows allows it.")
        if present < image_rows:
            blank = self.blank_pixel_rows(image_rows - present)
            batch["pixel_values"] = blank if pixels is None else torch.cat([pixels, blank])

    def blank_pixel_rows(self, count: int) -> torch.Tensor:
        """`count` rows of pixel_values as this processor shapes an image (fixed-size families), all zero."""
        if self.pixel_row_shape is None:
            blank = Image.new("RGB", (32, 32))
            processed = self.processor.image_processor(blank, return_tensors="np", do_pan_and_scan=False)
            self.pixel_row_shape = processed["pixel_values"].shape[1:]
        return torch.zeros((count, *self.pixel_row_shape), dtype=torch.float32)

    def stand_in_row(self) -> EncodedRow:
        """A one-token row with nothing trained (<bos>, or <pad> without one), for a batch whose rows were all skipped:
        no batch would crash the trainer, and on several ranks leave the others waiting in the gradient all-reduce."""
        bos = self.tokenizer.bos_token_id
        token = self.pad_token_id if bos is None else bos
        token_types = np.zeros(1, dtype=np.int64) if "token_type_ids" in self.processor.model_input_names else None
        return EncodedRow(np.array([token]), np.array([IGNORE_INDEX]), token_types, slice(0, 0))

    def decode(self, token_ids) -> list[str]:
        """Generated continuations as text, special tokens left out."""
        return self.processor.batch_decode(token_ids, skip_special_tokens=True)


@dataclass
class EncodedRow:
    input_ids: np.ndarray
    labels: np.ndarray
    token_type_ids: Optional[np.ndarray]
    image_slice: slice  # this row's images within the batch's pixel_values
    row_index: int = -1  # in its split; -1 for a stand-in row
    pack: int = 0  # with --packing: the batch's pack it goes in


# A chat of one question and one answer: what a template writes around turns.
SAMPLE_CHAT = [{"role": "user", "content": [text_part("x")]}, {"role": "assistant", "content": [text_part("y")]}]


def render_with_assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat, with each assistant turn's span in characters, from the template itself: from the end of the chat
    before it rendered with a generation prompt to the end of the chat through it, less trailing whitespace (the
    end-of-turn token is trained, not the newline after it)."""
    text = processor.apply_chat_template(messages, tokenize=False)
    spans = []
    for index in [i for i, message in enumerate(messages) if message["role"] == "assistant"]:
        prompt = processor.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        last = index + 1 == len(messages)  # then the chat up to it is the whole one, rendered already
        upto = (text if last else processor.apply_chat_template(messages[: index + 1], tokenize=False)).rstrip()
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise UsageError("The chat template does not render conversations as growing prefixes, so assistant tokens "
                             "cannot be located; this template is not supported.")
        spans.append((len(prompt), len(upto)))
    return text, spans


def end_of_turn_token_id(processor) -> Optional[int]:
    """The token that closes an assistant turn, read off the chat template (e.g. <end_of_turn>, <|im_end|>)."""
    text, [(start, end)] = render_with_assistant_spans(processor, SAMPLE_CHAT)
    marker = text[start:end].split("y", 1)[1].strip()
    ids = processor.tokenizer(marker, add_special_tokens=False).input_ids if marker else []
    return ids[0] if ids else None


def assistant_token_labels(input_ids: np.ndarray, token_starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Labels that keep a token only when it starts inside an assistant span (positions in the processed text)."""
    trained = np.zeros(len(input_ids), dtype=bool)
    for start, end in spans:
        trained |= (token_starts >= start) & (token_starts < end)
    return np.where(trained, input_ids, IGNORE_INDEX)


def format_trained_tokens(tokenizer, input_ids, labels) -> str:
    """Decode a row with the trained stretches in [[...]] and long runs of one token (images) collapsed."""
    pieces = []
    pairs = zip(map(int, input_ids), map(int, labels))
    for trained, stretch in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        text = decode_collapsing_runs(tokenizer, [token for token, _ in stretch])
        pieces.append(f"[[{text}]]" if trained else text)
    return "".join(pieces)


def decode_collapsing_runs(tokenizer, ids: list[int], min_run: int = 4) -> str:
    """Decode whole stretches (so word spacing survives), writing a run of >= min_run equal tokens as tok×n."""
    runs = [(token, len(list(run))) for token, run in itertools.groupby(ids)]
    pieces = []
    for collapsed, group in itertools.groupby(runs, key=lambda run: run[1] >= min_run):
        if collapsed:
            pieces += [f"{tokenizer.decode([token], skip_special_tokens=False)}×{count}" for token, count in group]
        else:
            stretch = [token for token, count in group for _ in range(count)]
            pieces.append(tokenizer.decode(stretch, skip_special_tokens=False))
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------------
# Collator: length policy and padding
# ---------------------------------------------------------------------------------------------------


class VisionChatCollator:
    """Turns dataset rows into model batches that train on assistant tokens only, encoding them per batch (the
    validation pass only checks them). Beyond the encoder: bad rows it still finds (undecodable pixels, or any with
    --validate_rows none) stop the run or are dropped (--invalid_rows); --max_seq_length; padding to the lengths
    --padding_strategy allows, and on Gaudi the images to a number fixed per length (gaudi_image_rows)."""

    def __init__(self, encoder: ChatEncoder, data_args: DataArguments, skipped_rows: SkippedRows,
                 extra_model_inputs: Optional[dict] = None, model_config=None,
                 image_rows: Optional[GaudiImageRows] = None):
        self.encoder = encoder
        self.data_args = data_args
        self.skipped_rows = skipped_rows
        # Forward keyword arguments the trainer passes on with every batch (Gemma 3's HPU attention options).
        self.extra_model_inputs = extra_model_inputs or {}
        self.model_config = model_config  # for families whose packed positions come from the model (Qwen2.5-VL)
        self.image_rows = image_rows  # on Gaudi: the images each batch sequence is padded to, else None

    def __call__(self, features: list[dict]) -> dict:
        try:
            return self.collate(features)
        except StopIteration as e:
            # Leaving here, it would end the DataLoader's epoch early and silently (it means "no more batches").
            rows = [f"{feature['split']} row {feature['row_index']}" for feature in features]
            raise RuntimeError(f"StopIteration while building the batch of {rows}") from e

    def row_ids_per_sequence(self) -> int:
        """The `row_ids` each batch sequence carries: one, or with --packing one per token (the pack length)."""
        return self.data_args.packing_length if self.data_args.packing else 1

    def collate(self, features: list) -> dict:
        # With --packing the items are packs (lists of rows): their rows are encoded as one batch, then laid end to end.
        packs = features if features and isinstance(features[0], list) else None
        if packs is not None:
            features = [{**feature, "pack": number} for number, pack in enumerate(packs) for feature in pack]
        kept, chats = [], []
        for feature in features:
            try:
                chats.append(self.encoder.training_chat(feature["row"]))
                kept.append(feature)
            except InvalidRowError as e:
                self.skipped_rows.reject(feature, e)
        kept, rows, processed = self.encode(kept, chats)
        fitted = []
        for feature, row in zip(kept, rows):
            try:
                fitted.append(dataclasses.replace(self.fit_length(row, feature), row_index=feature["row_index"],
                                                  pack=feature.get("pack", 0)))
            except InvalidRowError as e:
                self.skipped_rows.reject(feature, e)
        if packs is not None:
            return self.lay_out_packs(fitted, processed, len(packs))
        return self.pad(fitted, processed, len(features))

    def encode(self, kept: list[dict], chats: list) -> tuple[list[dict], list[EncodedRow], dict]:
        """Encode the batch; where the processor rejects it, the rows it rejects alone are bad rows and the rest are
        encoded without them. An error no single row causes is no row's fault, and is raised."""
        if not chats:
            return [], [], {}
        try:
            return kept, *self.encoder.encode(chats)
        except Exception:
            errors = self.encoder.processor_errors(chats)
            if not errors:
                raise
        for index, error in errors.items():
            self.skipped_rows.reject(kept[index], error)
        good = [index for index in range(len(chats)) if index not in errors]
        return self.encode([kept[i] for i in good], [chats[i] for i in good])

    def marked_text(self, feature: dict) -> str:
        """One row as the model gets it, with the trained tokens in [[...]]."""
        batch = self([feature])
        return format_trained_tokens(self.encoder.tokenizer, batch["input_ids"][0], batch["labels"][0])

    def fit_length(self, row: EncodedRow, feature: dict) -> EncodedRow:
        """Apply --max_seq_length: cut only the tail of the last answer, never an image or a whole answer."""
        limit = self.data_args.max_seq_length
        check_fits(len(row.input_ids), np.flatnonzero(row.labels != IGNORE_INDEX), limit)
        if len(row.input_ids) <= limit:
            return row
        truncated = InvalidRowError("answer_truncated", f"{len(row.input_ids)} tokens cut to {limit}")
        self.skipped_rows.reject(feature, truncated, "truncated")
        token_type_ids = None if row.token_type_ids is None else row.token_type_ids[:limit]
        return dataclasses.replace(row, input_ids=row.input_ids[:limit], labels=row.labels[:limit],
                                   token_type_ids=token_type_ids)

    def padded_length(self, longest: int) -> int:
        strategy, max_seq_length = self.data_args.padding_strategy, self.data_args.max_seq_length
        if strategy == "max_length":
            return max_seq_length
        if strategy == "bucket":
            # Rows are cut to --max_seq_length, so it holds any row longer than buckets chosen from measured lengths.
            return next((length for length in self.data_args.length_buckets if length >= longest), max_seq_length)
        return longest

    def pad(self, rows: list[EncodedRow], processed: dict, batch_size: int) -> dict:
        rows = rows or [self.encoder.stand_in_row()] * batch_size
        length = self.padded_length(max(len(r.input_ids) for r in rows))
        fill = {"input_ids": self.encoder.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        if rows[0].token_type_ids is not None:
            fill["token_type_ids"] = 0
        batch = {key: torch.full((len(rows), length), value, dtype=torch.long) for key, value in fill.items()}
        for i, row in enumerate(rows):
            values = {"input_ids": row.input_ids, "attention_mask": 1, "labels": row.labels,
                      "token_type_ids": row.token_type_ids}
            for key in fill:
                batch[key][i, : len(row.input_ids)] = torch.as_tensor(values[key])
        kept_images = [j for row in rows for j in range(row.image_slice.start, row.image_slice.stop)]
        if kept_images:
            batch.update(self.encoder.image_inputs(processed, kept_images))
        if self.image_rows is not None and length in self.image_rows.per_length:  # not with --padding_strategy longest
            self.encoder.pad_images(batch, len(rows) * self.image_rows.per_length[length])
        # Which rows these are, for error messages, and the padding tokens (a stand-in row's too), a host number; both
        # taken out before the model's forward (TrainingLossMonitor).
        batch["row_ids"] = torch.tensor([row.row_index for row in rows], dtype=torch.long)
        batch["padding_tokens"] = batch["input_ids"].numel() - sum(len(r.input_ids) for r in rows if r.row_index >= 0)
        # The model computes logits only where the loss needs them (causal_lm_loss).
        batch["logits_to_keep"] = kept_logit_positions(batch["labels"])
        return {**batch, **self.extra_model_inputs}

    def lay_out_packs(self, rows: list[EncodedRow], processed: dict, num_packs: int) -> dict:
        """--packing: each pack's rows end to end, then padding, --packing_length tokens in all. position_ids restart
        at 0 with every row (and with the padding), which is how each row is kept apart: transformers reads the rows'
        boundaries from position_ids when there is no attention_mask (masking_utils.py:719-722, find_packed_sequence_
        indices at :619-643), for Gemma 3 (whose image blocks and sliding window then apply within each row,
        modeling_gemma3.py:906-929), LLaVA-NeXT's language model and Qwen2.5-VL (from the first of its 4-row
        position_ids, modeling_qwen2_5_vl.py:876-891); flash_attention_2 on CUDA reads the same position_ids as
        varlen boundaries, for one pack per batch (modeling_flash_attention_utils.py:439-452, settle_defaults); on
        Gaudi, Gemma 3's reference masks compare the same boundaries (gemma3_reference_attention_masks). A row's
        first label is never a target: alone, nothing predicts it; packed, the previous row's last token would.
        `row_ids` holds each token's row (-1: padding); no cache (use_cache False), see below."""
        length = self.data_args.packing_length
        grouped = [[row for row in rows if row.pack == number] or [self.encoder.stand_in_row()]
                   for number in range(num_packs)]
        fill = {"input_ids": self.encoder.pad_token_id, "labels": IGNORE_INDEX, "row_ids": -1}
        if grouped[0][0].token_type_ids is not None:
            fill["token_type_ids"] = 0
        batch = {key: torch.full((num_packs, length), value, dtype=torch.long) for key, value in fill.items()}
        positions = torch.zeros((num_packs, length), dtype=torch.long)
        rope = self.encoder.family.packed_rope_positions
        rope_positions = torch.zeros((3, num_packs, length), dtype=torch.long) if rope is not None else None
        for i, pack in enumerate(grouped):
            tokens = sum(len(row.input_ids) for row in pack)
            if tokens > length:  # the packs were filled from the validation pass's lengths, which the encoding matches
                raise RuntimeError(f"The pack of rows {[row.row_index for row in pack]} holds {tokens} tokens, more "
                                   f"than --packing_length {length}: the validation pass measured them shorter.")
            start = 0
            for row in pack:
                end = start + len(row.input_ids)
                labels = torch.as_tensor(row.labels).clone()
                labels[0] = IGNORE_INDEX
                values = {"input_ids": row.input_ids, "labels": labels, "row_ids": row.row_index,
                          "token_type_ids": row.token_type_ids}
                for key in fill:
                    batch[key][i, start:end] = torch.as_tensor(values[key])
                positions[i, start:end] = torch.arange(end - start)
                if rope is not None:
                    rope_positions[:, i, start:end] = rope(self.model_config, row, processed)
                start = end
            positions[i, start:] = torch.arange(length - start)
            if rope is not None:
                rope_positions[:, i, start:] = torch.arange(length - start)
        # Qwen2.5-VL: the text positions (for the mask) first, then each row's own 3-D rope index.
        batch["position_ids"] = positions if rope is None else torch.cat([positions[None], rope_positions])
        kept_images = [j for pack in grouped for row in pack
                       for j in range(row.image_slice.start, row.image_slice.stop)]
        if kept_images:
            batch.update(self.encoder.image_inputs(processed, kept_images))
        if self.image_rows is not None:
            self.encoder.pad_images(batch, num_packs * self.image_rows.per_pack)
        batch["padding_tokens"] = int((batch["row_ids"] < 0).sum())
        batch["logits_to_keep"] = kept_logit_positions(batch["labels"])
        # No cache: with one (which the language models create whenever use_cache is on, as in evaluation: transformers
        # 4.55.4 gemma3/modeling_gemma3.py:504-505, qwen2_5_vl/modeling_qwen2_5_vl.py:848-849, mistral/modeling_mistral.
        # py:338-339) transformers reads no rows from position_ids (masking_utils.py:719) and the rows would see each
        # other.
        batch["use_cache"] = False
        return {**batch, **self.extra_model_inputs}


def check_fits(length: int, trained_positions: np.ndarray, limit: int) -> None:
    """A row of `length` tokens is bad with no trained token, or when over `limit` with its last answer starting
    beyond it (answers are runs of trained tokens, and only the tail of the last one may be cut)."""
    if len(trained_positions) == 0:
        raise InvalidRowError("no_trained_tokens", "no assistant token survived tokenization")
    if length <= limit:
        return
    gaps = np.flatnonzero(np.diff(trained_positions) > 1)
    last_answer_start = int(trained_positions[gaps[-1] + 1] if len(gaps) else trained_positions[0])
    if limit <= last_answer_start:
        raise InvalidRowError("too_long", f"{length} tokens; the last answer starts at token {last_answer_start}, "
                                          f"beyond --max_seq_length {limit}")


def dry_run_data(args: ScriptArguments) -> dict:
    """--dry_run_data N: build N training batches as training would and check them, without loading the model. The
    encoder checks image-token counts; here each row must also have a trained token and exactly one <bos>."""
    setup_run(args.training)
    config, family, processor = load_processor(args.model)
    splits, schema, image_base_dir = load_data(args.data, args.training, args.model.cache_dir)
    encoder = ChatEncoder(processor, family, schema, args.data, image_base_dir)
    skipped_rows = SkippedRows.for_run(args.training, args.data.invalid_rows)
    splits = validate_rows(encoder, splits, skipped_rows, args.training, args.model.cache_dir)
    settle_length_buckets(encoder, splits, args.training)
    settle_packs(encoder, splits, args.training)
    collator = VisionChatCollator(encoder, args.data, skipped_rows, model_config=config)
    rows = splits.get("train") or next(iter(splits.values()))
    items = PackedRows(rows) if args.data.packing else rows  # an item: a row, or under --packing a pack of rows
    batch_size, bos = args.training.per_device_train_batch_size, processor.tokenizer.bos_token_id
    checked = collections.Counter()
    for start in range(0, min(args.run.dry_run_data * batch_size, len(items)), batch_size):
        features = [items[i] for i in range(start, min(start + batch_size, len(items)))]
        batch = collator(features)
        # row_ids: one per sequence, or under --packing one per token (-1: padding, or a skipped row).
        kept = set(batch["row_ids"].unique().tolist()) - {-1}
        for row_id in sorted(kept):
            at_row = batch["row_ids"] == row_id
            ids, labels, where = batch["input_ids"][at_row], batch["labels"][at_row], f"{rows.split} row {row_id}"
            if not (labels != IGNORE_INDEX).any():
                raise UsageError(f"Dry run: {where} has no trained token.")
            if bos is not None and int((ids == bos).sum()) != 1:
                raise UsageError(f"Dry run: {where} has {int((ids == bos).sum())} <bos> tokens, not 1.")
        row_features = [f for item in features for f in (item if isinstance(item, list) else [item])]
        images = [as_image_list(f["row"].get(schema.image_column)) for f in row_features if f["row_index"] in kept]
        checked["batches"] += 1
        checked["rows"] += len(kept)
        checked["images"] += sum(map(len, images))
    log_trained_sample(collator, {"train": rows})
    logger.info(f"Dry run passed: {dict(checked)}; every row has trained tokens and one <bos>.")
    return dict(checked)


def log_trained_sample(collator: VisionChatCollator, splits: dict) -> None:
    """Show one encoded row with its trained tokens marked, so a wrong mask is visible before training."""
    rows = splits.get("train") or splits.get("eval")
    if rows is not None and len(rows):
        marked = collator.marked_text(rows[0])
        logger.info(f"Sample {rows.split} row {rows.row_indices[0]}, trained tokens in [[...]]:\n{marked}")


# ---------------------------------------------------------------------------------------------------
# Model and LoRA
# ---------------------------------------------------------------------------------------------------


def load_model(model_args: ModelArguments, training_args, config):
    auto = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    dtype = auto if model_args.torch_dtype == "auto" else getattr(torch, model_args.torch_dtype)
    attention = training_args.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path, config=config, torch_dtype=dtype, **hub_kwargs(model_args),
        # Gaudi's fused attention is switched on per forward call (see hpu_model_inputs), not at load time.
        attn_implementation="eager" if attention == "gaudi_fused_sdpa" else attention)
    # The KV cache is useless in training and conflicts with gradient checkpointing.
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = False
    if training_args.gradient_checkpointing:
        # Lets gradients reach the LoRA layers through checkpointed blocks whose inputs are frozen embeddings.
        model.enable_input_require_grads()
    return model


def apply_lora(model, lora_args: LoraArguments, family: ModelFamily):
    from peft import LoraConfig, get_peft_model
    requested = lora_args.lora_target_modules
    if not requested:
        targets = default_lora_targets(model, family, lora_args)
    elif len(requested) == 1 and re.search(r"[\^\$\*\+\?\[\]\(\)\|\\]", requested[0]):
        targets = requested[0]  # one regular expression
    else:
        targets = list(requested)
    # The projector, when asked, is trained in full and saved with the adapter.
    to_save = [module_named(model, family.projector)[0]] if lora_args.train_projector else None
    config = LoraConfig(r=lora_args.lora_rank, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM", modules_to_save=to_save)
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        raise UsageError(f"--lora_target_modules {lora_args.lora_target_modules}: {e}") from e
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), LoRA targets: "
                f"{config.target_modules}")
    return model


def adapter_for_run(args: ScriptArguments) -> Optional[str]:
    """The adapter a run that does not train evaluates, predicts with or merges: --adapter_path when given; else the
    newest trained one in --output_dir (the saved training, or a later complete checkpoint), unless
    --overwrite_output_dir asks to start afresh; else None, the base model."""
    if args.run.adapter_path:
        return args.run.adapter_path
    output_dir = Path(args.training.output_dir)
    adapter = None
    if output_dir.is_dir() and not args.training.overwrite_output_dir:
        saved_step = -1  # the step of the adapter saved at the end of training, if one is
        if (output_dir / "adapter_config.json").is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                saved_step = json.loads((output_dir / "trainer_state.json").read_text()).get("global_step", 0)
            saved_step = max(saved_step, 0)
            adapter = str(output_dir)
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint and Path(checkpoint, "adapter_config.json").is_file():
            if int(Path(checkpoint).name.rsplit("-", 1)[1]) > saved_step:
                adapter = checkpoint
    if adapter is None and args.run.merge_adapter:
        raise UsageError(f"--merge_adapter: nothing to merge, no --adapter_path and no trained adapter in --output_dir "
                         f"{output_dir}{' (--overwrite_output_dir ignores it)' * args.training.overwrite_output_dir}.")
    return adapter


def with_adapter(model, adapter: Optional[str], model_args: ModelArguments):
    """The base model with `adapter` loaded (not trainable), or the base model alone; says which in one line."""
    base = model_args.model_name_or_path
    if adapter is None:
        logger.info(f"Model: {base} without an adapter (no --adapter_path, and none trained in --output_dir, or "
                    "--overwrite_output_dir).")
        return model
    from peft import PeftModel
    logger.info(f"Model: {base} with the adapter in {adapter}")
    try:
        return PeftModel.from_pretrained(model, adapter, cache_dir=model_args.cache_dir)
    except (ValueError, RuntimeError) as e:  # e.g. an adapter trained on another base model: shapes differ
        raise UsageError(f"The adapter in {adapter} does not fit --model_name_or_path {base}: {one_line(e)}") from e


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


def linear_layers_pattern(prefix: str, module: torch.nn.Module, exclude: Optional[str] = None) -> str:
    """A regex (without anchors) for the linear layers under `prefix`, by their last names."""
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, layer in module.named_modules()
                         if isinstance(layer, torch.nn.Linear) and not (exclude and name.startswith(exclude))})
    if not leaf_names:
        raise UsageError(f"No linear layers under '{prefix}'; set --lora_target_modules.")
    excluded = rf"(?!{re.escape(exclude)}\.)" if exclude else ""
    return rf"{re.escape(prefix)}\.{excluded}(?:.*\.)?({'|'.join(map(re.escape, leaf_names))})"


def module_named(model, last_name: str) -> tuple[str, torch.nn.Module]:
    """The outermost module whose name ends in `last_name` (e.g. "vision_tower"), with its full name."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == last_name:
            return name, module
    raise ValueError(f"The model has no module named '{last_name}'; the MODEL_FAMILIES entry does not fit it.")


# ---------------------------------------------------------------------------------------------------
# Trainer: loss, monitors, preemption, and the Gaudi trainer
# ---------------------------------------------------------------------------------------------------


def build_trainer(model, training_args, model_args, run_args, processor, splits, collator,
                  lora_args: Optional[LoraArguments] = None):
    monitor = TrainingLossMonitor(run_args.non_finite_loss, splits["train"].split if "train" in splits else "train",
                                  collator.row_ids_per_sequence())
    model.register_forward_pre_hook(monitor.take_batch_extras, with_kwargs=True)
    train, evaluated = (splits[name].loss_batches_source() if name in splits else None for name in ("train", "eval"))
    common = dict(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluated,
        data_collator=collator, processing_class=processor, compute_loss_func=monitor.loss,
        # Preemption first: the checkpoint it asks for at a step end is then a save the monitor checks before.
        callbacks=[PreemptionHandler(), monitor])
    rates = part_learning_rates(model, lora_args, training_args.learning_rate) if lora_args is not None else {}
    if not hasattr(training_args, "use_habana"):
        return PartLearningRatesTrainer(part_learning_rates=rates, **common)
    from optimum.habana import GaudiConfig, GaudiTrainer

    class TokenCountingGaudiTrainer(PartLearningRatesTrainer, GaudiTrainer):
        """GaudiTrainer with per-part learning rates and whole-split evaluation (the MRO puts PartLearningRatesTrainer's
        and WholeSplitEvaluationTrainer's overrides before GaudiTrainer's) and a trained-token count for the
        accumulation window that works with unequal lengths: GaudiTrainer concatenates the window's labels to count
        them, which fails silently when micro-batches differ in length (bucket or longest padding), leaving the loss
        not normalized over the window; Trainer sums per micro-batch."""

        get_batch_samples_transformers = Trainer.get_batch_samples

    # --model_revision pins the model's commit; the Gaudi config is another repository, read at its default branch.
    name = training_args.gaudi_config_name
    gaudi_config = GaudiConfig.from_pretrained(name, cache_dir=model_args.cache_dir) if name else GaudiConfig()
    return TokenCountingGaudiTrainer(gaudi_config=gaudi_config, part_learning_rates=rates, **common)


class TrainingLossMonitor(transformers.TrainerCallback):
    """The trainer's loss function, plus what it sees: batch shapes, non-finite losses, the evaluation loss.

    It reads no device value between the trainer's own syncs (logging, saving, evaluating, the end): on Gaudi each
    read stalls the host until the device queue drains. A non-finite training loss is flagged on the device and its
    batch contributes no gradient; at the next sync the run stops naming the step and rows, or (non_finite_loss
    "skip") goes on, counting the batch. A forward pre-hook takes `row_ids` out of the batch and notes `logits_to_keep`.
    """

    def __init__(self, non_finite_loss: str = "error", split: str = "train", row_ids_per_sequence: int = 1):
        self.non_finite_loss, self.split = non_finite_loss, split
        # row_ids per batch sequence: 1, or with --packing one per token (the pack length).
        self.row_ids_per_sequence = row_ids_per_sequence
        # Padding tokens and all tokens of the batches seen, as the collator counted them (host numbers, no device op).
        self.padding = {"train": [0, 0], "eval": [0, 0]}
        # Counted where the loss is computed, so dataloader workers do not hide them; in Gaudi lazy mode each
        # new (batch, length, kept logits, image tensor shapes) signature is a graph compile.
        self.shapes = {"train": collections.Counter(), "eval": collections.Counter()}
        self.image_shapes: tuple = ()  # this batch's image inputs: ((name, shape), ...)
        self.row_ids: Optional[torch.Tensor] = None
        self.kept_positions: Optional[torch.Tensor] = None
        self.skipped_batches = 0
        self.gradient_hooks = []
        self.non_finite: Optional[torch.Tensor] = None  # this micro-batch's flag, read by the gradient hooks
        self.first_bad: Optional[dict] = None  # on the device: the first non-finite loss since the last check
        self.checked_step = 0
        self.evaluation: Optional[torch.Tensor] = None  # while evaluating: (row slot, [loss sum, trained tokens])

    def take_batch_extras(self, module, args, kwargs):
        self.row_ids = kwargs.pop("row_ids", None)
        padding = kwargs.pop("padding_tokens", None)
        if padding is not None:
            counted = self.padding["train" if torch.is_grad_enabled() else "eval"]
            counted[0] += padding
            counted[1] += kwargs["input_ids"].numel()
        self.image_shapes = tuple((name, tuple(kwargs[name].shape)) for name in IMAGE_INPUT_NAMES
                                  if torch.is_tensor(kwargs.get(name)))
        kept = kwargs.get("logits_to_keep")
        self.kept_positions = kept if torch.is_tensor(kept) else None
        return args, kwargs

    def loss(self, outputs, labels, num_items_in_batch=None):
        kept = labels.shape[1] if self.kept_positions is None else len(self.kept_positions)
        self.shapes["train" if torch.is_grad_enabled() else "eval"][(*labels.shape, kept, self.image_shapes)] += 1
        if self.kept_positions is not None:
            labels = labels_at_kept_positions(labels, self.kept_positions)
        if not torch.is_grad_enabled() and self.evaluation is not None:
            return self.evaluation_loss(outputs, labels)
        loss = causal_lm_loss(outputs, labels, num_items_in_batch)
        if not torch.is_grad_enabled() or self.first_bad is None:  # not in trainer.train()
            return loss
        finite = torch.isfinite(loss)
        self.non_finite = ~finite
        bad = self.first_bad
        first = self.non_finite & (bad["count"] == 0)
        rows = self.row_ids.flatten() if self.row_ids is not None else bad["rows"][:0]
        rows = torch.nn.functional.pad(rows.to(bad["rows"]), (0, len(bad["rows"]) - len(rows)), value=-1)
        bad["count"] += self.non_finite.to(torch.int32)
        bad["step"] = torch.where(first, bad["current_step"], bad["step"])
        bad["rows"] = torch.where(first, rows, bad["rows"])
        bad["loss"] = torch.where(first, loss.detach(), bad["loss"])
        return torch.where(finite, loss, torch.zeros_like(loss))

    def padding_fraction(self, stage: str, accelerator) -> Optional[float]:
        """The share of padding in the batches `stage` saw since the last call, over every rank (one sync)."""
        (padding, tokens), self.padding[stage] = self.padding[stage], [0, 0]
        counted = torch.tensor([padding, tokens], dtype=torch.long, device=accelerator.device)
        padding, tokens = accelerator.reduce(counted, reduction="sum").tolist()  # every rank, batches or none
        return padding / tokens if tokens else None

    def zero_if_non_finite(self, grad: torch.Tensor) -> torch.Tensor:
        """Gradient hook: a non-finite batch's gradient is zero. Selecting, not multiplying: 0 * NaN is NaN."""
        return grad if self.non_finite is None else grad.masked_fill(self.non_finite, 0)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.first_bad = {
            "count": torch.zeros((), dtype=torch.int32, device=args.device),
            # The step under way, counted on the device so that noting it costs no transfer.
            "current_step": torch.tensor(state.global_step, dtype=torch.int32).to(args.device),
            "step": torch.full((), -1, dtype=torch.int32, device=args.device),
            "rows": torch.full((args.per_device_train_batch_size * self.row_ids_per_sequence,), -1, dtype=torch.long,
                               device=args.device),
            "loss": torch.zeros((), dtype=torch.float32, device=args.device)}
        self.checked_step = state.global_step
        self.gradient_hooks = [p.register_hook(self.zero_if_non_finite) for p in model.parameters() if p.requires_grad]

    def on_step_begin(self, args, state, control, **kwargs):
        self.first_bad["current_step"] += 1

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_evaluate or control.should_training_stop:
            self.check_non_finite(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.on_step_end(args, state, control)
        logger.info(f"Epoch {state.epoch:.2f}: {self.describe_shapes('train')}")

    def on_train_end(self, args, state, control, **kwargs):
        self.check_non_finite(state.global_step)
        for hook in self.gradient_hooks:
            hook.remove()
        self.gradient_hooks, self.non_finite = [], None

    def describe_shapes(self, stage: str) -> str:
        shapes, self.shapes[stage] = self.shapes[stage], collections.Counter()

        def images(image_shapes) -> str:
            return "".join(f", {name} {'x'.join(map(str, shape))}" for name, shape in image_shapes)

        listed = ", ".join(f"{b}x{n} ({k} logits{images(i)}): {count}"
                           for (b, n, k, i), count in sorted(shapes.items()))
        return f"{len(shapes)} distinct {stage} batch shapes ({listed})"

    def check_non_finite(self, step: int) -> None:
        """Read the device-side record of non-finite losses; called only where the trainer syncs anyway."""
        if self.first_bad is None:
            return
        bad, since, self.checked_step = self.first_bad, self.checked_step, step
        count = int(bad["count"].item())
        if count == 0:
            return
        rows = list(dict.fromkeys(r for r in bad["rows"].tolist() if r >= 0))
        where = f"training step {int(bad['step'].item())}, {self.split} rows {rows}"
        seen = (f"{count} batch{'es' if count > 1 else ''} with a non-finite loss in steps {since + 1}-{step}, "
                "each contributing no gradient")
        if self.non_finite_loss == "error":
            raise FloatingPointError(f"Non-finite loss ({bad['loss'].item()}) at {where} ({seen}). Check these rows "
                                     "and the learning rate, or pass --non_finite_loss skip to drop such batches.")
        self.skipped_batches += count
        logger.warning(f"Skipped {seen}; the first at {where}.")
        bad["count"].zero_()

    def start_evaluation(self, dataset, device) -> None:
        """While evaluating, per-row loss sums: one slot per row of the split (found by its row index in the sorted
        indices, so the buffer grows with the rows evaluated, not with the split's size), plus one for stand-in rows."""
        row_indices = getattr(dataset, "row_indices", None)
        row_indices = np.sort(row_indices) if row_indices is not None else np.zeros(0, dtype=np.int64)
        self.evaluation_rows = torch.as_tensor(row_indices, dtype=torch.long, device=device)
        self.evaluation = torch.zeros((len(row_indices) + 1, 2), dtype=torch.float32, device=device)

    def evaluation_loss(self, outputs, labels) -> torch.Tensor:
        token_losses, trained = next_token_losses(outputs, labels)
        if self.row_ids.dim() == 2:
            return self.packed_evaluation_loss(token_losses, trained)
        per_row = torch.stack([token_losses.sum(dim=1), trained.sum(dim=1).float()], dim=1)
        row_slots = torch.searchsorted(self.evaluation_rows, self.row_ids)
        slots = torch.where(self.row_ids >= 0, row_slots, len(self.evaluation) - 1)
        # Copied, not added: a row accelerate repeats to even out the ranks' last batches counts once.
        self.evaluation.index_copy_(0, slots, per_row)
        return per_row[:, 0].sum() / per_row[:, 1].sum().clamp(min=1)

    def packed_evaluation_loss(self, token_losses: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
        """evaluation_loss for packs: each target token's row (row_ids of the token a loss position predicts), its
        sums added up per row within each pack, then copied into the rows' slots (a whole row is in one pack). A pack
        accelerate repeats to fill a batch (even_batches) is taken once: its rows' sums are equal, the largest kept."""
        row_ids = self.row_ids.to(token_losses.device)[:, 1:]
        if self.kept_positions is not None:  # laid out as labels_at_kept_positions lays out the labels
            row_ids = torch.nn.functional.pad(row_ids, (0, 1), value=-1)
            row_ids = row_ids.index_select(1, self.kept_positions.to(row_ids.device))
        slots = torch.where(row_ids >= 0, torch.searchsorted(self.evaluation_rows, row_ids.contiguous()),
                            len(self.evaluation) - 1)
        per_token = torch.stack([token_losses, trained.float()], dim=-1)  # (packs, positions, 2)
        per_pack = torch.zeros((len(slots), *self.evaluation.shape), dtype=self.evaluation.dtype, device=slots.device)
        per_pack.scatter_add_(1, slots.unsqueeze(-1).expand_as(per_token), per_token)
        seen = torch.zeros(len(self.evaluation), dtype=torch.bool, device=slots.device).index_fill_(0, slots.flatten(),
                                                                                                   True)
        self.evaluation = torch.where(seen.view(-1, 1), per_pack.amax(dim=0), self.evaluation)
        return per_token[..., 0].sum() / per_token[..., 1].sum().clamp(min=1)

    def finish_evaluation(self) -> Optional[float]:
        """The per-token mean loss over the split, summed over ranks (one sync); None without trained tokens."""
        per_row, self.evaluation = self.evaluation[:-1].contiguous(), None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            # A row evaluated on two ranks (a repeat) has the same sums on both; rows a rank did not see are 0.
            torch.distributed.all_reduce(per_row, op=torch.distributed.ReduceOp.MAX)
        loss_sum, tokens = per_row.sum(dim=0).tolist()
        logger.info(f"Evaluation: {self.describe_shapes('eval')}")
        return loss_sum / tokens if tokens else None


def kept_logit_positions(labels: torch.Tensor) -> torch.Tensor:
    """The model's `logits_to_keep`: positions whose next token some row trains, padded with the last (never trained) to
    a power of two (at least 16, at most the length), so that few shapes occur. Every family's forward takes a tensor of
    positions: transformers 4.55.4 models/gemma3/modeling_gemma3.py:1095, qwen2_5_vl/modeling_qwen2_5_vl.py:1515,
    llava_next/modeling_llava_next.py:690; optimum-habana 1.21.2 transformers/models/gemma3/modeling_gemma3.py:940,999,
    qwen2_5_vl/modeling_qwen2_5_vl.py:1065, llava_next/modeling_llava_next.py:130 (to the upstream forward)."""
    length = labels.shape[1]
    needed = torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).flatten()
    size = min(length, max(16, 1 << (len(needed) - 1).bit_length()))
    return torch.cat([needed, torch.full((size - len(needed),), length - 1, dtype=torch.long)])


def labels_at_kept_positions(labels: torch.Tensor, kept_positions: torch.Tensor) -> torch.Tensor:
    """The labels, laid out for logits computed only at `kept_positions` (column i + 1: the target of logit i)."""
    pad = torch.nn.functional.pad
    next_tokens = pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).index_select(1, kept_positions.to(labels.device))
    return pad(next_tokens, (1, 0), value=IGNORE_INDEX)


def causal_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Float32 next-token cross-entropy over trained tokens (`labels[:, t + 1]` targets `logits[:, t]`), static shapes,
    divided by the trained tokens of the whole accumulation window (the trainer's `num_items_in_batch`), so that
    accumulating N batches of 1 gives the gradient of one batch of N."""
    token_losses, trained = next_token_losses(outputs, labels)
    count = trained.sum() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(count):
        return token_losses.sum() / count.to(token_losses.device).clamp(min=1)
    return token_losses.sum() / max(int(count), 1)


def next_token_losses(outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position float32 cross-entropy (0 where nothing is trained) and the trained-position mask."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    targets = labels[:, 1:].to(logits.device)
    logits = logits[:, : targets.shape[1], :].float().flatten(0, 1)
    losses = torch.nn.functional.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return losses.view(targets.shape), targets != IGNORE_INDEX


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a job they asked to stop
# gaudi_spawn.py's stop request (its STOP_SIGNAL), for a SIGTERM or Ctrl-C sent to the launcher: mpirun passes SIGUSR1
# on to the ranks and does nothing more, where it kills them a second or two after passing on a SIGTERM.
LAUNCHER_STOP_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, LAUNCHER_STOP_SIGNAL)


class PreemptionHandler(transformers.TrainerCallback):
    """On SIGTERM (what schedulers send before preempting), Ctrl-C (SIGINT) or the launcher's stop request (SIGUSR1),
    finish the step, save a checkpoint and stop, with exit code 130 for Ctrl-C and 143 otherwise. A second SIGTERM or
    Ctrl-C stops at once: a checkpoint cut short has no trainer_state.json, so resuming passes it over.

    Ranks agree on it after every step, so all stop at the same one: a MAX over the signal numbers in a gloo group of
    its own, on the CPU, so the host never waits for the device (a flag on the HPU, reduced by HCCL, would drain the
    device's queue every step)."""

    def __init__(self):
        self.signum = 0  # the stop signal this rank acts on: its own first one, or the ranks' agreed one; 0 for none
        self.received = 0  # the first stop signal this rank itself received: only a second one stops it at once
        self.stopped_at_step: Optional[int] = None
        self.host_group = None

    def install(self) -> dict:
        """Handle the stop signals from now on; returns the previous handlers, for `restore`."""
        return {signum: signal.signal(signum, self.request) for signum in STOP_SIGNALS}

    @staticmethod
    def restore(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def request(self, signum, frame) -> None:
        # Raw writes: writing to sys.stderr while the interrupted code does can fail (a reentrant call). Each on a
        # line of its own, after the progress bar's.
        name = signal.Signals(signum).name
        if not self.received:
            # A rank that already took the other ranks' agreed signal (a scheduler signalling nodes a moment apart)
            # gets here with its own first one: that is no second request.
            self.received, self.signum = signum, self.signum or signum
            if signum != LAUNCHER_STOP_SIGNAL:  # the launcher says so itself
                os.write(2, f"\n{name}: finishing this step, then saving a checkpoint and stopping; {name} again "
                            "stops at once.\n".encode())
        elif signum != LAUNCHER_STOP_SIGNAL:  # the launcher's request may come again; it asks for the same
            # os._exit: stopping means not waiting for anything, the save being written included (a SystemExit
            # would run the trainer's cleanup first). Under the launcher, it is the one to say so.
            if self.received != LAUNCHER_STOP_SIGNAL:
                os.write(2, f"\n{name} again: stopped at once, before the checkpoint was complete; resuming picks the "
                            "last complete one.\n".encode())
            os._exit(128 + signum)

    @property
    def exit_code(self) -> int:
        return 128 + signal.SIGINT if self.signum == signal.SIGINT else PREEMPTED_EXIT_CODE

    def on_train_begin(self, args, state, control, **kwargs):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.host_group is None and distributed and args.world_size > 1:
            self.host_group = torch.distributed.new_group(backend="gloo")  # every rank calls this, in the same order

    def on_step_end(self, args, state, control, **kwargs):
        if self.agree():
            self.stopped_at_step = state.global_step
            control.should_save = control.should_training_stop = True

    def agree(self) -> int:
        """The stop signal the ranks agree on (0 for none), every rank calling this at the same point (a collective,
        so also a barrier). Ranks without a signal of their own take the agreed one, so that every rank exits with
        the same code."""
        if self.host_group is not None:
            agreed = torch.tensor([self.signum], dtype=torch.int32)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
            agreed_signum = int(agreed.item())
            self.signum = self.signum or agreed_signum
        return self.signum


def part_learning_rates(model, lora_args: LoraArguments, learning_rate: float) -> dict[str, float]:
    """{last module name: learning rate} of the model parts trained at a rate of their own (--vision_learning_rate,
    --projector_learning_rate), projector first: Qwen2.5-VL's sits inside its vision tower."""
    family = model_family(model.config.model_type)
    rates = {family.projector: lora_args.projector_learning_rate, family.vision_tower: lora_args.vision_learning_rate}
    # A trained projector keeps --learning_rate unless given its own, even inside a tower that has its own.
    if lora_args.train_projector and rates[family.projector] is None and rates[family.vision_tower] is not None:
        rates[family.projector] = learning_rate
    return {name: rate for name, rate in rates.items() if rate is not None}


def split_learning_rate_groups(optimizer, model, rates: dict[str, float], learning_rate: float) -> list[str]:
    """Split each of the optimizer's parameter groups (one per weight decay) by model part: the parameters under a
    module named in `rates` go to a group of that learning rate, the rest keep theirs. Done on the built optimizer,
    before its first step, through torch's add_param_group, so that it works whichever optimizer the trainer chose
    (Trainer.create_optimizer, transformers/trainer.py; GaudiTrainer's, optimum/habana/transformers/trainer.py, which
    picks Habana's FusedAdamW itself). Returns one line per part, for the log."""
    part_of = {}
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        part_of[id(parameter)] = next((part for part in rates if part in parts), None)
    groups = list(optimizer.param_groups)
    optimizer.param_groups.clear()
    counts = collections.Counter()
    for group in groups:
        by_part = collections.defaultdict(list)
        for parameter in group["params"]:
            by_part[part_of.get(id(parameter))].append(parameter)
        for part, parameters in by_part.items():
            optimizer.add_param_group({**group, "params": parameters, "lr": rates.get(part, group["lr"])})
            counts[part] += sum(parameter.numel() for parameter in parameters)
    return [f"{part or 'the rest'}: learning rate {rates.get(part, learning_rate):g} ({counts[part]:,} parameters)"
            for part in [None, *rates] if counts[part]]


class WholeSplitEvaluationTrainer(Trainer):
    """Trainer whose evaluation sees every row of the split, its loss the per-token mean over it (build_trainer also
    puts it in front of GaudiTrainer). Trainer and GaudiTrainer average per-batch means (transformers/trainer.py
    evaluation_loop; optimum/habana/transformers/trainer.py:2263-2265), weighing a short answer like a long one and
    varying with the batch size."""

    def _get_dataloader(self, *args, is_training: bool = False, **kwargs):
        # --dataloader_drop_last is for training shapes; transformers/trainer.py:1030 applies it to evaluation
        # too, which would drop up to batch - 1 rows per rank.
        drop_last = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = drop_last and is_training
        try:
            return super()._get_dataloader(*args, is_training=is_training, **kwargs)
        finally:
            self.args.dataloader_drop_last = drop_last

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The split's loss is the monitor's (evaluation_loop below). Returning the batch's loss too would have the
        # loop gather it across ranks and concatenate it on the device after every batch (transformers/trainer.py
        # :4459-4461; optimum/habana/transformers/trainer.py:2149-2151): a collective and, on Gaudi, a growing
        # tensor, a new graph, per batch.
        _, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        return None, logits, labels

    def evaluation_loop(self, dataloader, *args, metric_key_prefix: str = "eval", **kwargs):
        monitor = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, TrainingLossMonitor))
        monitor.start_evaluation(dataloader.dataset, self.args.device)
        try:
            output = super().evaluation_loop(dataloader, *args, metric_key_prefix=metric_key_prefix, **kwargs)
            loss = monitor.finish_evaluation()
        finally:
            monitor.evaluation = None
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_loss"] = loss
        padding = monitor.padding_fraction("eval", self.accelerator)
        if padding is not None:
            output.metrics[f"{metric_key_prefix}_padding_fraction"] = padding
        return output


class PartLearningRatesTrainer(WholeSplitEvaluationTrainer):
    """Trainer whose optimizer trains the model parts in `part_learning_rates` ({last module name: learning rate}) at
    their own rates, with WholeSplitEvaluationTrainer's evaluation; build_trainer also puts it in front of
    GaudiTrainer."""

    def __init__(self, *args, part_learning_rates: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.part_learning_rates = part_learning_rates or {}

    def create_optimizer(self):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer()
        if fresh and self.part_learning_rates:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise UsageError(f"--vision_learning_rate / --projector_learning_rate need a torch optimizer; --optim "
                                 f"{self.args.optim} builds a {type(optimizer).__name__}.")
            lines = split_learning_rate_groups(optimizer, self.model, self.part_learning_rates,
                                               self.args.learning_rate)
            logger.info("Optimizer parameter groups: " + "; ".join(lines))
        return optimizer

    def learning_rates(self) -> set[float]:
        """The learning rates this run's optimizer groups start from."""
        return {self.args.learning_rate, *self.part_learning_rates.values()}


def train_and_save(trainer, num_rows: int) -> None:
    """Train (resuming from the checkpoint the arguments settled on), then save the adapter, processor and metrics."""
    args = trainer.args
    batch, accumulation, world = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size
    logger.info(f"Running training on {num_rows} rows: world size {world}, per-device batch {batch}, "
                f"gradient accumulation {accumulation}, effective batch size {batch * world * accumulation}")
    if args.resume_from_checkpoint:
        check_checkpoint_trains_this_model(trainer.model, args.resume_from_checkpoint)
        warn_of_the_checkpoint_learning_rates(args.resume_from_checkpoint, trainer.learning_rates())
        logger.info(f"Resuming from {args.resume_from_checkpoint}; pass --overwrite_output_dir to start afresh.")
        let_torch_load_restore_to_an_indexed_cpu()
    elif args.should_save:
        # The Trainer adds each run's metrics to this file; a training started afresh starts it afresh.
        Path(args.output_dir, "all_results.json").unlink(missing_ok=True)
    preemption = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PreemptionHandler))
    # Installed until the training is saved: a stop during the final save waits for it (a second one stops at once).
    previous_handlers, stopped_after_training = preemption.install(), False
    try:
        train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        # Every rank waits for rank 0's saves before a stop: the first rank to exit would end an MPI job while rank 0
        # still writes.
        if preemption.stopped_at_step is not None:
            trainer.accelerator.wait_for_everyone()
        else:
            save_training(trainer, train_result, num_rows)
            # A stop that came after the last step's end (during the final checkpoint, say), agreed by all ranks.
            stopped_after_training = bool(preemption.agree())
    finally:
        preemption.restore(previous_handlers)
    if preemption.stopped_at_step is not None:
        logger.error(f"Preempted ({signal.Signals(preemption.signum).name}): stopped after step "
                     f"{preemption.stopped_at_step} with a checkpoint in {args.output_dir}. "
                     "Resume with the same command.")
        raise SystemExit(preemption.exit_code)
    if stopped_after_training:
        # The training is complete and saved; what follows (evaluation, generation) is left to the rerun, which finds
        # the training finished.
        logger.error(f"Preempted ({signal.Signals(preemption.signum).name}) after the last step: the adapter and "
                     f"training results are saved in {args.output_dir}. Run the same command again for the rest.")
        raise SystemExit(preemption.exit_code)


def check_checkpoint_trains_this_model(model, checkpoint: str) -> None:
    """Refuse, in one line, to resume a checkpoint whose adapter holds other trained weights than this run's model
    (a rerun that adds --train_projector or changes --lora_rank): PEFT would otherwise fail deep inside loading it
    (peft/utils/save_and_load.py:414, a KeyError) or load mismatched shapes. Compares names and shapes only (the
    file's header). Not under DeepSpeed ZeRO-3, whose checkpoints keep the weights in DeepSpeed's own files and save
    an empty adapter file unless gathering is asked for (transformers/trainer.py:3986)."""
    from peft import get_peft_model_state_dict
    from safetensors import safe_open
    from transformers.integrations import is_deepspeed_zero3_enabled

    saved_file = Path(checkpoint, "adapter_model.safetensors")
    if is_deepspeed_zero3_enabled() or not saved_file.is_file():
        return
    prefix = "base_model.model."  # PEFT's, on every name: left out of the message
    with safe_open(str(saved_file), framework="pt") as saved:
        saved_shapes = {name.removeprefix(prefix): tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
    if not saved_shapes:  # weights kept elsewhere (ZeRO-3 without gathering), whatever this run's settings
        return
    shapes = {name.removeprefix(prefix): tuple(tensor.shape)
              for name, tensor in get_peft_model_state_dict(model).items()}
    differences = [f"{name} is new" for name in sorted(shapes.keys() - saved_shapes.keys())]
    differences += [f"{name} is not trained now" for name in sorted(saved_shapes.keys() - shapes.keys())]
    differences += [f"{name} has shape {list(shapes[name])}, not {list(saved_shapes[name])}"
                    for name in sorted(shapes.keys() & saved_shapes.keys()) if shapes[name] != saved_shapes[name]]
    if differences:
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise UsageError(f"{checkpoint} trained other weights than this command would ({differences[0]}{more}): "
                         "resume with the LoRA flags it was trained with (--lora_rank, --lora_target_modules, "
                         "--train_vision_tower, --train_projector), or pass --overwrite_output_dir to start afresh.")


def warn_of_the_checkpoint_learning_rates(checkpoint: str, learning_rates: set[float]) -> None:
    """Say so when the command's learning rates differ from the checkpoint's: the Trainer restores the checkpoint's
    scheduler, whose base rates then go on (torch's LRScheduler.load_state_dict restores base_lrs), and the rates
    given now would pass silently. A scheduler saved elsewhere (DeepSpeed's own checkpoint) is not read."""
    path = Path(checkpoint, "scheduler.pt")
    if not path.is_file():
        return
    saved = set(torch.load(path, map_location="cpu", weights_only=True).get("base_lrs", ()))
    if saved and saved != learning_rates:
        listed = ", ".join(f"{rate:g}" for rate in sorted(saved))
        logger.warning(f"Resuming from {checkpoint}: its learning rates ({listed}) go on, as the Trainer restores its "
                       f"scheduler; this command's ({', '.join(f'{rate:g}' for rate in sorted(learning_rates))}) "
                       "apply to a fresh start only (--overwrite_output_dir).")


def save_training(trainer, train_result, num_rows: int) -> None:
    """The adapter and processor, the training metrics (with the padding fraction) and the trainer state."""
    trainer.save_model()
    metrics = {**train_result.metrics, "train_samples": num_rows}
    monitor = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainingLossMonitor))
    padding = monitor.padding_fraction("train", trainer.accelerator)
    if padding is not None:
        metrics["train_padding_fraction"] = padding
    trainer.save_metrics("train", metrics)
    trainer.save_state()


# ---------------------------------------------------------------------------------------------------
# Evaluation: loss, generation and answer metrics
# ---------------------------------------------------------------------------------------------------


def evaluate_splits(trainer, splits: dict, generator: Optional[GenerationEvaluator], before: dict) -> None:
    """Evaluate the eval split (--do_eval) and the test split (--do_predict); save their metrics (the run's summary
    shows the main ones)."""
    evaluated = {}
    for stage, prefix in (("eval", "eval"), ("test", "predict")):
        if stage in splits:
            evaluated[prefix] = evaluate_split(trainer, splits[stage], prefix, generator)
            trainer.save_metrics(prefix, {**evaluated[prefix], **(before if prefix == "eval" else {})})
    if before and "eval" in evaluated:
        log_before_and_after(before, evaluated["eval"])


def evaluate_split(trainer, rows: IndexedRows, prefix: str, generator: Optional[GenerationEvaluator]) -> dict:
    """Loss and perplexity over assistant tokens, plus generation metrics when asked; logged and returned."""
    metrics = trainer.evaluate(eval_dataset=rows.loss_batches_source(), metric_key_prefix=prefix)
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(loss) if loss < 700 else float("inf")
    metrics[f"{prefix}_samples"] = len(rows)
    if generator is not None:
        records = generator.evaluate(trainer.accelerator.unwrap_model(trainer.model), rows, trainer.accelerator)
        scores = {f"{prefix}_{k}": v for k, v in aggregate_scores(records, generator.group_column).items()}
        metrics.update(scores)
        trainer.log(scores)
        if trainer.args.should_save:
            generator.write_predictions(Path(trainer.args.output_dir, "predictions.jsonl"), prefix, records)
            if "tensorboard" in trainer.args.report_to:
                generator.write_table(trainer.args, prefix, records, trainer.state.global_step)
    return metrics


class GenerationEvaluator:
    """Answers evaluation rows by greedy generation and scores them against the gold answers. The prompt is the
    training chat up to the last assistant turn, built by the same ChatEncoder; rows are sharded over ranks."""

    def __init__(self, encoder: ChatEncoder, skipped_rows: SkippedRows, eval_args: EvaluationArguments,
                 batch_size: int = 8, prompt_lengths: Optional[list[int]] = None,
                 generate_options: Optional[dict] = None, image_rows_per_prompt: Optional[int] = None):
        self.encoder = encoder
        self.skipped_rows = skipped_rows
        self.max_new_tokens = eval_args.generation_max_new_tokens
        self.group_column = eval_args.metrics_group_column
        self.batch_size = batch_size
        # Static shapes (Gaudi lazy mode): prompts are left-padded to one of these lengths, one graph each.
        self.prompt_lengths = prompt_lengths
        self.generate_options = generate_options or {}
        # Gaudi: pixel_values rows each prompt is padded to with blank images (ChatEncoder.pad_images), or None.
        self.image_rows_per_prompt = image_rows_per_prompt
        self.end_of_turn = end_of_turn_token_id(encoder.processor)
        self.prompt_shapes = collections.Counter()
        self.predictions_written = False

    @classmethod
    def for_run(cls, encoder: ChatEncoder, skipped_rows: SkippedRows, args: ScriptArguments,
                image_rows: Optional[GaudiImageRows] = None) -> GenerationEvaluator:
        """The evaluator of --generation_eval: batches and lengths as in evaluation, HPU options on Gaudi and, with
        static prompt lengths there, every prompt's images padded to one number (gaudi_image_rows)."""
        prompt_lengths = args.data.length_buckets if args.data.padding_strategy == "bucket" else None
        per_prompt = image_rows.per_prompt if image_rows is not None and prompt_lengths else None
        return cls(encoder, skipped_rows, args.evaluation, args.training.per_device_eval_batch_size, prompt_lengths,
                   hpu_generation_options(args.training), per_prompt)

    def generate(self, model, features: list[dict]) -> list[dict]:
        prepared = []
        for feature in features:
            try:
                prepared.append((feature, *self.encoder.generation_prompt(feature["row"])))
            except InvalidRowError as e:
                self.skipped_rows.reject(feature, e)
        if not prepared:
            return []
        # Static shapes: a short last batch is filled with copies of its last prompt (answers dropped below).
        fill = self.batch_size - len(prepared) if self.prompt_lengths else 0
        texts = [p[1] for p in prepared] + [prepared[-1][1]] * fill
        images = [p[2] for p in prepared] + [prepared[-1][2]] * fill
        # Left padding: generation continues every row from the same position.
        inputs = self.encoder.process(texts, images, padding_side="left", return_tensors="pt")
        inputs = self.pad_prompts(inputs)
        if self.image_rows_per_prompt:
            self.encoder.pad_images(inputs, len(texts) * self.image_rows_per_prompt)
        inputs = inputs.to(model.device)
        self.prompt_shapes[tuple(inputs["input_ids"].shape)] += 1
        with torch.no_grad():
            output = hpu_generation_model(model, self.generate_options).generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                eos_token_id=stop_token_ids(model, self.end_of_turn), **self.generate_options)
        answers = self.encoder.decode(output[:, inputs["input_ids"].shape[1]:])
        records = []
        for (feature, _, _, golds, question), answer in zip(prepared, answers):
            # The generated text as is, and the answer scored (without surrounding whitespace).
            record = {"split": feature["split"], "row_index": feature["row_index"], "question": question,
                      "gold_answers": golds, "generated": answer, "prediction": answer.strip()}
            record.update(score_prediction(record["prediction"], golds))
            if self.group_column in feature["row"]:
                record[self.group_column] = feature["row"][self.group_column]
            records.append(record)
        return records

    def pad_prompts(self, inputs):
        """Left-pad the batch's prompts to the smallest of `prompt_lengths` that holds them (static shapes)."""
        length = inputs["input_ids"].shape[1]
        target = next((n for n in self.prompt_lengths or () if n >= length), length)
        for key, value in {"input_ids": self.encoder.pad_token_id, "attention_mask": 0, "token_type_ids": 0}.items():
            if key in inputs and target > length:
                inputs[key] = torch.nn.functional.pad(inputs[key], (target - length, 0), value=value)
        return inputs

    def evaluate(self, model, rows: IndexedRows, accelerator) -> list[dict]:
        """Records for every row of `rows`, in row order, identical on every rank."""
        mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
        batches = [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        was_training = model.training
        model.eval()
        records = []
        self.prompt_shapes.clear()
        quiet = not accelerator.is_local_main_process
        for batch in tqdm(batches, desc=f"Generating answers ({rows.split})", disable=quiet):
            records.extend(self.generate(model, [rows[position] for position in batch]))
        model.train(was_training)
        shapes = ", ".join(f"{b}x{n}: {count}" for (b, n), count in sorted(self.prompt_shapes.items()))
        logger.info(f"Generation ({rows.split}): {len(self.prompt_shapes)} distinct prompt shapes ({shapes})")
        gathered = gather_object(records) if accelerator.num_processes > 1 else records
        return sorted(gathered, key=lambda record: record["row_index"])

    def write_predictions(self, path: Path, evaluation: str, records: list[dict]) -> None:
        """Append to predictions.jsonl; the first write of a run starts the file afresh."""
        with open(path, "a" if self.predictions_written else "w") as f:
            f.writelines(json.dumps({"evaluation": evaluation, **record}, default=str) + "\n" for record in records)
        self.predictions_written = True

    def write_table(self, training_args, evaluation: str, records: list[dict], step: int, rows: int = 16) -> None:
        """A TensorBoard text table of the first `rows` rows (the same ones before and after training)."""
        from torch.utils.tensorboard import SummaryWriter
        header = "| row | question | gold answers | prediction | relaxed accuracy | ANLS |\n|---|---|---|---|---|---|\n"
        cells = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        table = header + "".join(
            f"| {r['row_index']} | {cells(r['question'])} | {cells(' / '.join(r['gold_answers']))} | "
            f"{cells(r['prediction'])} | {r['relaxed_accuracy']:.0f} | {r['anls']:.2f} |\n" for r in records[:rows])
        with SummaryWriter(log_dir=training_args.logging_dir) as writer:
            writer.add_text(f"{evaluation}/predictions", table, global_step=step)


def stop_token_ids(model, end_of_turn: Optional[int]) -> list[int]:
    """The model's own end tokens plus the chat template's end-of-turn token: generation stops at either."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return eos + ([end_of_turn] if end_of_turn is not None and end_of_turn not in eos else [])


def log_before_and_after(before: dict, after: dict) -> None:
    """One line per quality metric: the untouched model's value, then the fine-tuned one's."""
    metrics = {name[len("eval_before_"):]: value for name, value in before.items()}
    metrics = {m: v for m, v in metrics.items() if m.startswith(("loss", "perplexity", *METRIC_NAMES))}
    width = max(map(len, metrics), default=0)
    lines = [f"  {m:<{width}} {v:>10.4f} -> {after.get('eval_' + m, float('nan')):>10.4f}" for m, v in metrics.items()]
    logger.info("Evaluation before -> after training:\n" + "\n".join(lines))


# Pure-Python answer metrics (ChartQA relaxed accuracy, exact match, ANLS): no torch, no Hub downloads.
# relaxed_accuracy, exact_match and anls follow the published evaluation code rule for rule, so they can be put next
# to papers' and leaderboards' numbers; relaxed_accuracy_lenient is this project's own, more forgiving reading.
METRIC_NAMES = ("relaxed_accuracy", "relaxed_accuracy_lenient", "exact_match", "anls")

# For the lenient scoring only: an optional sign, an optional "$", digits (plain or grouped by commas in threes)
# with an optional fraction, or a bare fraction (".5"), then an optional "%". No exponents, no "nan"/"inf".
_NUMBER_RE = re.compile(r"^([+-]?)\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)%?$")


def normalize_answer(text) -> str:
    """Canonical form for the lenient relaxed accuracy: lower-cased, stripped, whitespace runs collapsed, then one
    trailing period dropped ("Blue ." -> "blue"); other punctuation and articles kept."""
    text = " ".join(answer_text(text).lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def parse_number(text) -> Optional[float]:
    """The plain number an answer spells for the lenient relaxed accuracy, else None. Accepts surrounding whitespace,
    a sign, a leading "$", thousands grouped in threes and a trailing "%" (dropped, not divided: "12%" -> 12.0);
    "12 apples", "1e3", "nan", "1,23" and "" give None."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text) if math.isfinite(text) else None
    match = _NUMBER_RE.match(str(text).strip())
    return None if match is None else float(match.group(1) + match.group(2).replace(",", ""))


def answer_text(answer) -> str:
    """An answer as the metrics read it: None is the empty string, other non-strings (an int gold) go through str."""
    return "" if answer is None else str(answer)


def relaxed_number(text: str) -> Optional[float]:
    """The number the standard relaxed accuracy reads, or None: pix2struct's `_to_float` inside `relaxed_correctness`
    (pix2struct/metrics.py). Whatever float() accepts ("1e3", "1_000", " 12 ", "nan", "inf"; not "1,234" or "$5");
    trailing "%" signs are dropped and the rest divided by 100 ("27%" -> 0.27, "12 %" -> 0.12)."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(prediction, gold) -> bool:
    """ChartQA's relaxed accuracy for one gold answer, as pix2struct's `relaxed_correctness` (pix2struct/metrics.py),
    used by lmms-eval (lmms_eval/tasks/chartqa/utils.py) and VLMEvalKit (vlmeval/dataset/utils/vqa_eval.py). The
    prediction is stripped (as VLMEvalKit does), the gold is not. A gold reading as a non-zero number (`relaxed_number`)
    and a numeric prediction match iff |prediction - gold| / |gold| <= 0.05 (a NaN or infinite gold never does);
    otherwise, a gold of 0 included, the strings must be equal ignoring case."""
    pred_text, gold_text = answer_text(prediction).strip(), answer_text(gold)
    pred_number, gold_number = relaxed_number(pred_text), relaxed_number(gold_text)
    if pred_number is not None and gold_number is not None and gold_number != 0:
        return abs(pred_number - gold_number) / abs(gold_number) <= 0.05
    return pred_text.lower() == gold_text.lower()


def relaxed_match_lenient(prediction, gold) -> bool:
    """This project's own, more forgiving relaxed accuracy (no published protocol): when both answers parse as numbers
    (`parse_number` after `normalize_answer`: "12." is 12, "12%" 12, "$1,234" 1234), correct iff within 5% of |gold|
    (a gold of 0 needs exactly 0); otherwise the normalized strings must be equal ("Yes." matches "yes")."""
    pred_text, gold_text = normalize_answer(prediction), normalize_answer(gold)
    pred_number, gold_number = parse_number(pred_text), parse_number(gold_text)
    if pred_number is not None and gold_number is not None:
        return pred_number == 0 if gold_number == 0 else abs(pred_number - gold_number) <= 0.05 * abs(gold_number)
    return pred_text == gold_text


def exact_match(prediction, gold) -> bool:
    """Equality after stripping and lower-casing both, as VLMEvalKit's "accuracy" method (vlmeval/dataset/utils/
    vqa_eval.py `process_line`): "Yes " matches "yes"; "Yes." and "12.0" do not match "yes" and "12"."""
    return answer_text(prediction).strip().lower() == answer_text(gold).strip().lower()


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
    """Normalized Levenshtein similarity, as lmms-eval's `anls` (lmms_eval/api/metrics.py) and VLMEvalKit's
    `anls_compute` + `hit_calculate` (vlmeval/dataset/utils/vqa_eval.py): the distance between the answers stripped,
    lower-cased and whitespace-collapsed, divided (as in both) by the longer answer's length as given, measured on its
    upper-cased form ("Pari   " vs "paris": 1 - 1/7). Two empty answers score 1; below `threshold` scores 0."""
    pred_raw, gold_raw = answer_text(prediction), answer_text(gold)
    pred_text, gold_text = " ".join(pred_raw.lower().split()), " ".join(gold_raw.lower().split())
    longest = max(len(pred_raw.upper()), len(gold_raw.upper()))
    score = 1.0 - (0.0 if longest == 0 else levenshtein_distance(pred_text, gold_text) / longest)
    return score if score >= threshold else 0.0


def score_prediction(prediction, golds) -> dict:
    """Each metric of METRIC_NAMES for one prediction, the best over all gold answers (as VLMEvalKit's `hit_calculate`
    and pix2struct's `aggregate_metrics`; lmms-eval's ChartQA has one gold). A single gold string counts as a list
    of one; no gold answers score 0 everywhere."""
    golds = [] if golds is None else [golds] if isinstance(golds, str) else list(golds)
    return {
        "relaxed_accuracy": float(any(relaxed_match(prediction, gold) for gold in golds)),
        "relaxed_accuracy_lenient": float(any(relaxed_match_lenient(prediction, gold) for gold in golds)),
        "exact_match": float(any(exact_match(prediction, gold) for gold in golds)),
        "anls": max((anls_score(prediction, gold) for gold in golds), default=0.0),
    }


def aggregate_scores(records: list, group_key: Optional[str] = None) -> dict:
    """Per metric of METRIC_NAMES, the mean over the records holding it; with `group_key` (e.g. ChartQA's
    "human_or_machine"), also per value of it as "<metric>_<value>" ("anls_human"). No records -> {}."""
    def means(rows) -> dict:
        result = {}
        for name in METRIC_NAMES:
            values = [float(row[name]) for row in rows if row.get(name) is not None]
            if values:
                result[name] = float(sum(values) / len(values))
        return result

    records = list(records)
    result = means(records)
    groups = collections.defaultdict(list)
    for row in records if group_key is not None else ():
        if row.get(group_key) is not None:
            groups[str(row[group_key])].append(row)
    for value in sorted(groups):
        result.update({f"{name}_{value}": mean for name, mean in means(groups[value]).items()})
    return result


# ---------------------------------------------------------------------------------------------------
# Outputs: reports, the merged model, one-question answers
# ---------------------------------------------------------------------------------------------------


def write_outputs(trainer, skipped_rows: SkippedRows, processor, args: ScriptArguments) -> None:
    """After every rank has recorded its own skipped rows: the report, the merged model when asked, and the flags of
    this run (a re-run of the same command then has nothing to do)."""
    trainer.accelerator.wait_for_everyone()
    if not trainer.args.should_save:
        return
    report = skipped_rows.write_report(trainer.args.output_dir)
    if any(report.values()):
        logger.warning(f"Rows skipped or truncated, by reason: {report} (see skipped_rows.json)")
    Path(trainer.args.output_dir, RUN_FLAGS_FILE).write_text(json.dumps(args.given, indent=1))
    if args.run.merge_adapter:
        model = trainer.accelerator.unwrap_model(trainer.model)
        export_merged(model, processor, Path(trainer.args.output_dir, "merged"))
    log_summary(trainer.args, args, report)


# The metrics the summary shows, of those all_results.json holds (per-group variants and timings left to the file).
SUMMARY_METRICS = ("train_loss", *(f"{split}_{name}" for split in ("eval", "predict")
                                   for name in ("loss", "perplexity", *METRIC_NAMES)))


def log_summary(training_args, args: ScriptArguments, report: dict) -> None:
    """The run's last lines: where each output is, and the main metrics."""
    folder = Path(training_args.output_dir)
    outputs = [("adapter", "adapter_model.safetensors", True), ("metrics", "all_results.json", True),
               ("predictions", "predictions.jsonl", args.evaluation.generation_eval),
               ("merged model", "merged", args.run.merge_adapter)]
    lines = [f"  {what:<13}{folder / name}" for what, name, made in outputs if made and (folder / name).exists()]
    if "tensorboard" in training_args.report_to and Path(training_args.logging_dir).is_dir():
        lines.append(f"  {'TensorBoard':<13}tensorboard --logdir {training_args.logging_dir}")
    if any(report.values()):
        counts = ", ".join(f"{sum(report[action].values())} {action}" for action in report if report[action])
        lines.append(f"  {'row report':<13}{folder / 'skipped_rows.json'} ({counts})")
    results = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        results = json.loads((folder / "all_results.json").read_text())
    shown = [f"{name} {results[name]:.4f}" for name in SUMMARY_METRICS if isinstance(results.get(name), (int, float))]
    if shown:
        lines.append("  " + ", ".join(shown))
    padding = [f"{split} {100 * results[f'{split}_padding_fraction']:.1f}%" for split in ("train", "eval", "predict")
               if isinstance(results.get(f"{split}_padding_fraction"), (int, float))]
    if padding:
        lines.append(f"  {'padding':<13}{', '.join(padding)} of the tokens in the batches")
    logger.info("Done. Outputs:\n" + "\n".join(lines))


def export_merged(model, processor, output_dir: Path) -> None:
    """Fold the LoRA weights into the base model and save what a server or a pipeline loads as is."""
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    if getattr(merged.config, "text_config", None) is not None:
        merged.config.text_config.use_cache = True
    merged.generation_config.eos_token_id = stop_token_ids(merged, end_of_turn_token_id(processor))
    merged.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    logger.info(f"Merged model written to {output_dir} (end of generation: {merged.generation_config.eos_token_id})")


def merge_saved_adapter(args: ScriptArguments) -> None:
    """--merge_adapter alone: fold the run's adapter (adapter_for_run) into the base model, written to
    <output_dir>/merged."""
    setup_run(args.training)
    model, processor, family = load_model_with_adapter(args)
    apply_pan_and_scan(processor, family, args.data)  # a model served from the merged folder crops as trained
    export_merged(model, processor, Path(args.training.output_dir, "merged"))


def answer_one_question(args: ScriptArguments) -> str:
    """--predict_image / --predict_question: the model's answer (with --adapter_path, the fine-tuned one's)."""
    if not Path(args.run.predict_image).is_file():
        raise UsageError(f"--predict_image {args.run.predict_image}: no such file.")
    setup_run(args.training)
    model, processor, family = load_model_with_adapter(args)
    use_gemma3_reference_attention(model, args.training)  # on Gaudi, the port answers as upstream Gemma 3 would
    encoder = ChatEncoder(processor, family, DatasetSchema("question_answer", "image", "question", "answer"), args.data)
    generator = GenerationEvaluator(encoder, SkippedRows(None, "error"), args.evaluation, batch_size=1,
                                    generate_options=hpu_generation_options(args.training))
    feature = {"row": {"image": args.run.predict_image, "question": args.run.predict_question, "answer": "unused"},
               "split": "command line", "row_index": 0}
    return generator.generate(model.to(args.training.device), [feature])[0]["prediction"]


def load_model_with_adapter(args: ScriptArguments):
    """(model with the run's adapter (adapter_for_run), processor, family), for the modes that do not train."""
    config, family, processor = load_processor(args.model)
    model = with_adapter(load_model(args.model, args.training, config), adapter_for_run(args), args.model)
    return model, processor, family


# ---------------------------------------------------------------------------------------------------
# Platform shims: Gaudi detection, MPI rank environment, HPU forward options
# ---------------------------------------------------------------------------------------------------


def missing_gaudi_packages() -> str:
    """The missing part of Gaudi's stack as a sentence subject ('' if none), found without importing optimum.habana
    (which crashes the process without Habana's stack)."""
    bridge, optimum = (importlib.util.find_spec(name) is not None for name in ("habana_frameworks", "optimum"))
    optimum_habana = optimum and importlib.util.find_spec("optimum.habana") is not None
    if bridge and optimum_habana:
        return ""
    if optimum_habana:
        return "Habana's PyTorch bridge (habana_frameworks, from Habana's PyTorch container) is"
    return "optimum-habana is" if bridge else "Habana's software stack (habana_frameworks and optimum-habana) is"


def training_arguments_class(given: dict[str, str]) -> type:
    """GaudiTrainingArguments where Habana's stack is installed, except for the modes that do not train without
    --use_habana (which GaudiTrainingArguments requires); the portable ones elsewhere."""
    modes_without_training = {"predict_image", "dry_run_data"} & set(given)
    trains = not (modes_without_training or ("merge_adapter" in given and "do_train" not in given))
    if not missing_gaudi_packages() and (trains or "use_habana" in given):
        from optimum.habana import GaudiTrainingArguments

        return GaudiTrainingArguments
    return PortableTrainingArguments


def hpu_generation_options(training_args) -> dict:
    """optimum-habana's generate() options on Gaudi: lazy mode and HPU graphs (both off unless passed,
    optimum/habana/transformers/generation/utils.py:1196-1197), static shapes, and stopping at the end tokens, which
    lazy mode would otherwise ignore (utils.py:1048-1049 takes ignore_eos from lazy_mode) and go on generating."""
    if not getattr(training_args, "use_habana", False) or training_args.use_cpu:
        return {}  # --use_cpu: GaudiTrainingArguments leaves transformers' own generate() (training_args.py:1053-1062)
    lazy = training_args.use_lazy_mode
    # HPU graphs need lazy mode (generation/utils.py:1334); hpu_generation_model wraps the model generate() runs.
    return {"lazy_mode": lazy, "hpu_graphs": lazy and training_args.use_hpu_graphs_for_inference, "static_shapes": lazy,
            "ignore_eos": False}


def hpu_generation_model(model, generate_options: dict):
    """The model to call generate() on, its generating model wrapped in HPU graphs (once) when the options ask for
    them. generate() runs the forward of the model under PEFT's wrapper (peft/peft_model.py:1973 calls the base model's
    generate, which calls `self(...)`, optimum/habana/transformers/generation/utils.py:2797), which GaudiTrainer's
    wrapping of the evaluated (PEFT) model (optimum/habana/transformers/trainer.py:2058-2067) does not reach. Only
    after any training: HPU graphs detach gradients."""
    if not generate_options.get("hpu_graphs"):
        return model
    generating = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(generating, "wrapped_in_hpu_graph_for_generation", False):
        from habana_frameworks.torch.hpu import wrap_in_hpu_graph

        wrapped = wrap_in_hpu_graph(generating)
        if wrapped is not generating:  # wrapped in a new module: put it where PEFT's wrapper calls it
            if generating is model:
                model = wrapped
            else:
                model.base_model.model = wrapped
        wrapped.wrapped_in_hpu_graph_for_generation = True
    return model


@functools.cache
def let_torch_load_restore_to_an_indexed_cpu() -> None:
    """On several CPU ranks accelerate gives each the device "cpu:0" (accelerate/state.py:833-837), where Trainer loads
    a resumed optimizer state (transformers/trainer.py:3485); torch.load knows how to restore to "cpu" only
    (torch/serialization.py, default_restore_location) and would fail. Storages read for "cpu:N" stay on the CPU."""
    torch.serialization.register_package(
        9, lambda storage: None, lambda storage, location: storage if re.fullmatch(r"cpu:\d+", location) else None)


def export_mpi_rank_environment() -> None:
    """Under mpirun, the rank in the variables torch.distributed and accelerate read (as torchrun sets them); without
    LOCAL_RANK, accelerate does not take the multi-HPU (HCCL) path on Gaudi."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" not in os.environ:
        return
    mpi_names = {"RANK": "OMPI_COMM_WORLD_RANK", "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE",
                 "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_WORLD_SIZE": "OMPI_COMM_WORLD_LOCAL_SIZE"}
    for name, mpi_name in mpi_names.items():
        if mpi_name in os.environ:
            os.environ[name] = os.environ[mpi_name]


def hpu_model_inputs(training_args, family: ModelFamily) -> dict:
    """Gemma 3's HPU forward options, sent with every batch on Gaudi: optimum-habana's port takes them as forward
    arguments, and GaudiTrainer does not pass them."""
    if not (family.hpu_attention_options and getattr(training_args, "use_habana", False)):
        return {}
    return {
        "use_flash_attention": training_args.attn_implementation == "gaudi_fused_sdpa",
        "flash_attention_recompute": training_args.flash_attention_recompute,
        "flash_attention_causal_mask": training_args.flash_attention_causal_mask,
        "flash_attention_fast_softmax": training_args.flash_attention_fast_softmax,
        "lazy_mode": training_args.use_lazy_mode,  # else the port marks lazy-mode steps even in eager mode
    }


# The batch's image tensors of every family (MODEL_FAMILIES' image_inputs), whose shapes TrainingLossMonitor's shape
# log shows: in Gaudi lazy mode a new one compiles new graphs.
IMAGE_INPUT_NAMES = ("pixel_values", "image_grid_thw", "image_sizes")


def settle_gaudi_image_size(encoder: ChatEncoder, config, splits: dict, training_args) -> None:
    """On Gaudi in lazy mode, a --fixed_image_size for the families whose image tensors follow each image's size
    (Qwen2.5-VL: pixel_values rows and image_grid_thw; LLaVA-NeXT: patches and image_sizes), unless given: each new
    size would compile new graphs. Chosen from the data (the median height and width of a seeded sample of the rows'
    images, headers only), snapped to a size the model takes without padding; logged. Before the validation pass, which
    then counts every image's tokens at that size; every rank chooses the same."""
    data_args = encoder.data_args
    snap = GAUDI_IMAGE_SIZES.get(getattr(config, "model_type", None))
    on_lazy_gaudi = getattr(training_args, "use_habana", False) and training_args.use_lazy_mode
    if snap is None or data_args.fixed_image_size or not on_lazy_gaudi:
        return
    sizes = sampled_image_sizes(encoder, splits, training_args.seed)
    if not sizes:
        return
    median = [int(np.median([size[axis] for size in sizes])) for axis in (0, 1)]
    data_args.fixed_image_size = [int(side) for side in snap(encoder, config, *median)]
    height, width = data_args.fixed_image_size
    logger.info(f"Every image is resized to {height}x{width} (height x width) on Gaudi, from the median size "
                f"{median[0]}x{median[1]} of {len(sizes)} sampled images, so that image shapes stay static; "
                "--fixed_image_size HEIGHT WIDTH chooses another size.")


ROWS_SAMPLED_FOR_IMAGE_SIZE = 256


def sampled_image_sizes(encoder: ChatEncoder, splits: dict, seed: int) -> list[tuple[int, int]]:
    """(height, width) of the images of a seeded sample of the splits' rows, from their headers; bad rows left out."""
    pooled = [(rows, position) for rows in splits.values() for position in range(len(rows))]
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(pooled), size=min(len(pooled), ROWS_SAMPLED_FOR_IMAGE_SIZE), replace=False))
    sizes = []
    for index in picked:
        rows, position = pooled[index]
        try:
            row = rows.dataset[int(rows.row_indices[position])]
            sizes += [image_size(image, encoder.image_base_dir) for image in encoder.canonical_row(row)["images"]]
        except InvalidRowError:
            continue
    return sizes


def qwen2_5_vl_gaudi_image_size(encoder: ChatEncoder, config, height: int, width: int) -> tuple[int, int]:
    """Sides in whole attention windows of optimum-habana's Qwen2.5-VL vision port, which pads each image's patch grid
    to whole windows and then its patch count by multiples of 64 (optimum/habana/transformers/models/qwen2_5_vl/
    modeling_qwen2_5_vl.py:262-313, asserting the 64); within the processor's pixel budget, which would otherwise
    resize again."""
    vision, image_processor = config.vision_config, encoder.processor.image_processor
    patch, merge = vision.patch_size, vision.spatial_merge_size
    window = max(1, vision.window_size // merge // patch)
    unit = patch * math.lcm(merge * window, 8)  # 8 x 8 patches: whole windows, and patch counts in multiples of 64
    max_pixels = encoder.image_kwargs.get("max_pixels", image_processor.max_pixels)
    min_pixels = encoder.image_kwargs.get("min_pixels", image_processor.min_pixels)
    scale = min(1.0, math.sqrt(max_pixels / (height * width)))
    height, width = (max(unit, round(side * scale / unit) * unit) for side in (height, width))
    while height * width > max_pixels and max(height, width) > unit:
        height, width = (height - unit, width) if height >= width else (height, width - unit)
    while height * width < min_pixels:
        height, width = (height + unit, width) if height <= width else (height, width + unit)
    return height, width


def llava_next_gaudi_image_size(encoder: ChatEncoder, config, height: int, width: int) -> tuple[int, int]:
    """The grid resolution LLaVA-NeXT's processor picks for such an image (transformers 4.55.4
    image_processing_utils.py select_best_resolution): resized to it, no image is padded."""
    from transformers.image_processing_utils import select_best_resolution

    return select_best_resolution((height, width), encoder.processor.image_processor.image_grid_pinpoints)


# model_type -> the fixed image size on Gaudi for a median (height, width); families absent here resize every image
# to one size themselves.
GAUDI_IMAGE_SIZES = {"qwen2_5_vl": qwen2_5_vl_gaudi_image_size, "llava_next": llava_next_gaudi_image_size}


@dataclass
class GaudiImageRows:
    """How many pixel_values rows (images and crops, real or blank) each batch sequence brings on Gaudi."""
    per_length: dict[int, int]  # a row padded to this length
    per_pack: Optional[int]  # a --packing pack
    per_prompt: int  # a generation prompt (whatever its length: a prompt is shorter than its row)


def gaudi_image_rows(encoder: ChatEncoder, splits: dict, training_args) -> Optional[GaudiImageRows]:
    """On Gaudi in lazy mode, for Gemma 3 (one pixel_values row per image and per --pan_and_scan crop, all of one
    size): the numbers of images the collator and the generation evaluator pad each batch sequence to with blank
    images (ChatEncoder.pad_images), so that every batch of one length has one pixel shape and the step signatures
    stay one per length, not one per number of images and crops; logged. A batch padded to length L holds rows of at
    most L tokens: the most image sequences of any row that short, as the validation pass counted them, or with
    --validate_rows none the most that L tokens hold; a pack, the most of any pack; a prompt, the most of any row.
    None elsewhere. Blank images cost the vision tower's time only: no token reads them, which needs the port's
    static_image_placeholder_mask (upstream's get_placeholder_mask refuses features no token reads; --use_cpu keeps
    the port out, training_args.py:1053-1062)."""
    data_args = encoder.data_args
    on_lazy_gaudi = getattr(training_args, "use_habana", False) and training_args.use_lazy_mode
    if not (on_lazy_gaudi and not training_args.use_cpu and encoder.family.hpu_attention_options):
        return None
    padded = {"bucket": data_args.length_buckets, "max_length": [data_args.max_seq_length]}.get(
        data_args.padding_strategy) or []
    measured = [(rows.token_lengths, rows.image_sequences) for rows in splits.values()]
    if all(lengths is not None for lengths, _ in measured):
        lengths = np.minimum(np.concatenate([lengths for lengths, _ in measured]), data_args.max_seq_length)
        sequences = np.concatenate([sequences for _, sequences in measured])
        per_length = {length: int(sequences[lengths <= length].max(initial=0)) for length in padded}
        per_prompt = int(sequences.max(initial=0))
    else:
        per_length = {length: length // encoder.processor.image_seq_length for length in padded}  # tokens per image
        per_prompt = data_args.max_seq_length // encoder.processor.image_seq_length
    per_pack = None
    if data_args.packing:
        per_pack = max((int(rows.image_sequences[pack].sum()) for rows in splits.values() for pack in rows.packs or ()),
                       default=0)
    rows = GaudiImageRows(per_length, per_pack, per_prompt)
    if per_prompt:
        counts = [f"{images} at length {length}" for length, images in per_length.items()]
        counts += [f"{per_pack} per pack"] * (per_pack is not None) + [f"{per_prompt} per generation prompt"]
        logger.info(f"On Gaudi, blank images pad each batch sequence's images and crops to {', '.join(counts)}, as many "
                    "as the rows have at most, so that image shapes stay static.")
    return rows


# ---------------------------------------------------------------------------------------------------
# Gaudi: Gemma 3 reference attention
# ---------------------------------------------------------------------------------------------------


def gemma3_reference_attention_masks(attention_mask: torch.Tensor, token_type_ids: Optional[torch.Tensor],
                                     sliding_window: Optional[int], dtype: torch.dtype,
                                     rows: Optional[torch.Tensor] = None) -> dict:
    """Gemma 3's attention as transformers 4.55.4 builds it (models/gemma3/modeling_gemma3.py:905-934,
    masking_utils.py:78-87,116-127), as the per-layer additive masks optimum-habana's port accepts: a query sees a
    non-padding key before it (on sliding layers, fewer than `sliding_window` before) or in the same image (a run of
    token_type_ids == 1); in packs (`rows`: each token's row number, masking_utils.py:130-136), in its own row only.
    Built on the device, nothing read back: one lazy-mode graph per batch shape."""
    batch, length = attention_mask.shape
    device = attention_mask.device
    positions = torch.arange(length, device=device)
    query_position, key_position = positions.view(length, 1), positions.view(1, length)
    earlier_or_self = (key_position <= query_position).view(1, 1, length, length)
    key_present = (attention_mask != 0).view(batch, 1, 1, length)
    same_image = torch.zeros((1, 1, 1, 1), dtype=torch.bool, device=device)
    if token_type_ids is not None:
        is_image = token_type_ids == 1
        previous_is_image = torch.cat([torch.zeros_like(is_image[:, :1]), is_image[:, :-1]], dim=1)
        # Images numbered 1, 2, ... along the row; text tokens get 0 and never match below.
        image_number = torch.cumsum((is_image & ~previous_is_image).to(torch.int32), dim=1) * is_image.to(torch.int32)
        same_image = is_image.view(batch, 1, length, 1) & (
            image_number.view(batch, 1, length, 1) == image_number.view(batch, 1, 1, length)
        )
    in_window = True if sliding_window is None else (query_position - key_position) < sliding_window
    visible = torch.zeros((), dtype=dtype, device=device)
    hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    if rows is not None:
        key_present = key_present & (rows.view(batch, 1, length, 1) == rows.view(batch, 1, 1, length))
    return {"full_attention": torch.where((earlier_or_self | same_image) & key_present, visible, hidden),
            "sliding_attention": torch.where((earlier_or_self & in_window | same_image) & key_present, visible, hidden)}


def gemma3_decoding_attention_masks(attention_mask: torch.Tensor, query_position, sliding_window: Optional[int],
                                    dtype: torch.dtype) -> dict:
    """The reference masks of one cached decoding step (a text query at `query_position`, a device tensor or an int):
    the non-padding keys up to the query, on sliding layers fewer than `sliding_window` before it (transformers 4.55.4
    masking_utils.py:78-87 with the query at its cache position). Static shapes: one graph whatever the position."""
    batch, length = attention_mask.shape
    key_position = torch.arange(length, device=attention_mask.device).view(1, length)
    visible = (attention_mask != 0) & (key_position <= query_position)
    in_window = True if sliding_window is None else key_position > query_position - sliding_window
    shown = torch.zeros((), dtype=dtype, device=attention_mask.device)
    hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return {"full_attention": torch.where(visible, shown, hidden).view(batch, 1, 1, length),
            "sliding_attention": torch.where(visible & in_window, shown, hidden).view(batch, 1, 1, length)}


def gemma3_reference_attention_hook(module, args: tuple, kwargs: dict):
    """Forward pre-hook of the port's Gemma3Model: the reference masks in place of the 2D padding mask, for a
    full-sequence forward (training, evaluation, a generation's prompt) and for a cached decoding step of one token;
    a mask dict passes as it is."""
    attention_mask, input_ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
    if isinstance(attention_mask, dict):
        return None
    inputs_embeds = kwargs.get("inputs_embeds")
    # The dtype of the attention scores: Habana's fused kernel takes a mask only in q's dtype, which under autocast
    # (GaudiTrainer's bf16) is the autocast dtype, else that of the embeddings (as the port's own masks,
    # modeling_gemma3.py:637-649).
    device_type = (input_ids if input_ids is not None else inputs_embeds).device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = inputs_embeds.dtype if inputs_embeds is not None else module.get_input_embeddings().weight.dtype
    sliding_window = getattr(module.config.get_text_config(), "sliding_window", None)
    length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    if kwargs.get("past_key_values") is not None:
        if attention_mask is None or length != 1:
            return None
        # The query's cache position: optimum-habana's static shapes keep it in token_idx, 1-based
        # (optimum/habana/transformers/generation/utils.py:1487, 669-670); otherwise the cache ends with it.
        token_idx = kwargs.get("token_idx")
        query_position = token_idx - 1 if token_idx is not None else attention_mask.shape[1] - 1
        kwargs["attention_mask"] = gemma3_decoding_attention_masks(attention_mask, query_position, sliding_window,
                                                                   dtype)
        return args, kwargs
    token_type_ids = kwargs.get("token_type_ids")
    if token_type_ids is None and input_ids is not None:
        # The port's prepare_inputs_for_generation drops token_type_ids (models/gemma3/modeling_gemma3.py:1103-1120);
        # Gemma 3's processor marks exactly the image tokens (transformers models/gemma3/processing_gemma3.py:146-149).
        token_type_ids = (input_ids == module.config.image_token_id).to(torch.long)
    if token_type_ids is None or length == 1:
        return None
    rows = None
    if attention_mask is None:
        attention_mask = torch.ones_like(token_type_ids)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            # Packs (--packing): the rows transformers finds in position_ids where no attention_mask is given
            # (masking_utils.py:719-722), by its own function.
            rows = find_packed_sequence_indices(position_ids.expand(attention_mask.shape[0], -1))
    kwargs["attention_mask"] = gemma3_reference_attention_masks(attention_mask, token_type_ids, sliding_window, dtype,
                                                                rows)
    return args, kwargs


def use_gemma3_reference_attention(model, training_args):
    """On Gaudi, make optimum-habana's Gemma 3 port attend as transformers' Gemma 3 does, in training, evaluation and
    generation, and find image tokens without a host sync (static_image_placeholder_mask); returns the hook's handle,
    or None where nothing is needed. optimum-habana 1.21.2's port never reads token_type_ids (models/gemma3/
    modeling_gemma3.py:828, 970-995), so image tokens would attend causally only, and its sliding-window mask
    (modeling_attn_mask_utils.py:60-65) shows `sliding_window + 1` keys where transformers shows `sliding_window`
    (masking_utils.py:85). It does take a dict of per-layer masks (modeling_gemma3.py:631, 683): the hook's."""
    if not getattr(training_args, "use_habana", False) or getattr(model.config, "model_type", None) != "gemma3":
        return None
    from optimum.habana.transformers.models.gemma3.modeling_gemma3 import GaudiGemma3Model

    ports = [module for module in model.modules() if isinstance(module, GaudiGemma3Model)]
    if not ports:  # the port is not installed (e.g. --use_cpu): transformers' own Gemma 3 attends as the reference
        return None
    if len(ports) > 1:
        raise RuntimeError(f"Expected one optimum-habana GaudiGemma3Model in the model, found {len(ports)}.")
    ports[0].get_placeholder_mask = static_image_placeholder_mask.__get__(ports[0])
    return ports[0].register_forward_pre_hook(gemma3_reference_attention_hook, with_kwargs=True)


def static_image_placeholder_mask(self, input_ids, inputs_embeds, image_features):
    """The port's get_placeholder_mask on Gaudi: the image-token positions, found as upstream finds them, without
    upstream's check that they are as many as the image features (transformers 4.55.4 models/gemma3/
    modeling_gemma3.py:819, called by optimum-habana's port at models/gemma3/modeling_gemma3.py:883), which indexes the
    embeddings with the boolean mask: a data-dependent shape, so in lazy mode a graph break and a device-to-host read
    on every forward. The check cannot fail on the script's batches: a row's text never holds an image marker
    (ChatEncoder.canonical_row), the processor writes each image's full token sequence, and --max_seq_length never cuts
    an image (check_fits), as the validation pass confirms before training."""
    if input_ids is None:  # embeddings passed in: upstream's own way to find the image positions
        return type(self).get_placeholder_mask(self, input_ids, inputs_embeds, image_features)
    return (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)


def check_gemma3_hpu_attention_flags(model_type: str, training_args) -> None:
    """Refuse the fused-attention flags that would make Gemma 3 on Gaudi train something else, or crash:
    --flash_attention_causal_mask calls the kernel with is_causal=True and no mask on every layer (models/gemma3/
    modeling_gemma3.py:323-326), dropping the images' two-way attention and the sliding window; fast softmax with
    recompute trips an assertion of Habana's FusedSDPA wrapper in training unless is_causal (hpex/kernels/FusedSDPA.py).
    """
    if model_type != "gemma3" or not getattr(training_args, "use_habana", False):
        return
    if getattr(training_args, "flash_attention_causal_mask", False):
        raise UsageError(
            "--flash_attention_causal_mask makes Gemma 3's fused attention purely causal on every layer, but its "
            "image tokens attend to each other both ways and its sliding-window layers see only the last "
            "sliding_window tokens: drop the flag (--attn_implementation gaudi_fused_sdpa alone keeps the right mask)."
        )
    fused = getattr(training_args, "attn_implementation", None) == "gaudi_fused_sdpa"
    fast_recompute = training_args.flash_attention_fast_softmax and training_args.flash_attention_recompute
    if fused and fast_recompute and training_args.do_train:
        raise UsageError(
            "--flash_attention_fast_softmax with --flash_attention_recompute is supported by Habana's fused attention "
            "only with a purely causal mask, which Gemma 3 cannot use: drop one of the two flags."
        )


if __name__ == "__main__":
    sys.exit(cli())
