# Licensed under the Apache License, Version 2.0 (the "License").
"""Shared fixtures and helpers: the tiny offline models and data (built once per test session), the flags of a
short CPU run, and the script's data path up to the collator (what `main` runs before it loads the model)."""

import atexit
import gc
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

# Every test runs offline; the model hub is never reachable here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Hermetic caches: the Hugging Face home of every test and of every subprocess a test starts (they inherit the
# environment) is one temporary folder per session, so nothing reaches ~/.cache/huggingface (the row checks' cache
# and datasets' cache of loaded files included). Set here, before any test module imports datasets or transformers:
# both read these variables once, at import (datasets/config.py, huggingface_hub/constants.py).


def hf_cache_environment(home) -> dict:
    """Variables that put every Hugging Face cache under `home`; HF_HUB_CACHE too, as it wins over HF_HOME."""
    home = Path(home)
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_DATASETS_CACHE": str(home / "datasets"),
            "HF_MODULES_CACHE": str(home / "modules"), "HF_XET_CACHE": str(home / "xet")}


# Names that would also win over HF_HOME (transformers warns when TRANSFORMERS_CACHE is set, so it is removed,
# not pointed at the folder).
OVERRIDING_CACHE_VARIABLES = ("TRANSFORMERS_CACHE", "HUGGINGFACE_HUB_CACHE", "PYTORCH_TRANSFORMERS_CACHE",
                              "PYTORCH_PRETRAINED_BERT_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE")
# A subprocess that imports this file again (a test file run as a script) keeps the environment its parent gave it.
HF_HOME_OWNER = "RUN_LORA_VLM_TESTS_HF_HOME"
if HF_HOME_OWNER not in os.environ:
    os.environ[HF_HOME_OWNER] = tempfile.mkdtemp(prefix="run-lora-vlm-tests-hf-")
    atexit.register(shutil.rmtree, os.environ[HF_HOME_OWNER], ignore_errors=True)
    for _name in OVERRIDING_CACHE_VARIABLES:
        os.environ.pop(_name, None)
    os.environ.update(hf_cache_environment(os.environ[HF_HOME_OWNER]))

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
# The one place the script and the tiny builders are made importable, for every test module.
for path in (REPO_ROOT, TESTS_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

IGNORE_INDEX = -100

# The seed commands of the product's brief (model flags apart, for the tests that replace them).
SEED_MODEL_FLAGS = ["--model_name_or_path", "google/gemma-3-12b-it", "--dataset_name", "HuggingFaceM4/ChartQA"]
SEED_SINGLE_CARD = [
    "--num_train_epochs", "5", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
    "--do_train", "--do_eval", "--output_dir", "./output_gemma3", "--gaudi_config_name", "Habana/gpt2",
    "--use_habana", "--lora_rank", "16", "--max_train_samples", "128", "--overwrite_output_dir", "--bf16",
    "--use_lazy_mode", "--gradient_checkpointing",
]
SEED_EIGHT_CARDS = [
    "--num_train_epochs", "5", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
    "--do_train", "--output_dir", "./output_gemma3", "--gaudi_config_name", "Habana/gpt2", "--use_habana",
    "--lora_rank", "16", "--max_train_samples", "4096", "--overwrite_output_dir", "--bf16", "--logging_steps", "50",
    "--log_level", "info", "--save_steps", "50", "--report_to", "tensorboard", "--do_eval", "--gradient_checkpointing",
]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "habana_double: tests of the habana_frameworks TEST DOUBLE itself (and of optimum-habana through "
        "it), not of the product; deselect with -m 'not habana_double' (tests/habana_double/README.md)")


@pytest.fixture(scope="session", autouse=True)
def frozen_garbage_collector():
    """Keep what exists once the test modules are imported (torch, transformers, ...) out of garbage collection.

    Every in-process training run ends in a full gc.collect() (accelerate's free_memory), which otherwise walks all
    of torch and transformers each time and costs more than a short training run itself.
    """
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """{"model": tiny Gemma 3 folder, "dataset": tiny ChartQA save_to_disk folder (64/16/16 rows)}."""
    import tiny_assets

    return tiny_assets.write_assets(str(tmp_path_factory.mktemp("assets")))


@pytest.fixture(scope="session")
def family_models(assets, tmp_path_factory):
    """{model_type: folder} of the tiny model of every supported family, each written once per session."""
    import tiny_llava_next
    import tiny_qwen2_5_vl

    folder = str(tmp_path_factory.mktemp("family_models"))
    return {
        "gemma3": assets["model"],
        "qwen2_5_vl": tiny_qwen2_5_vl.write_assets(folder)["model"],
        "llava_next": tiny_llava_next.write_assets(folder)["model"],
    }


@pytest.fixture(scope="session")
def chart_rows():
    """Four of tiny_assets' ChartQA-like rows: 96x64 bar charts with questions and answers."""
    import tiny_assets

    return tiny_assets.make_chart_rows(4, seed=0)


@pytest.fixture(scope="session")
def processor(assets):
    """The tiny Gemma 3's processor, as the script loads it."""
    import run_lora_vlm

    return run_lora_vlm.load_processor(run_lora_vlm.ModelArguments(model_name_or_path=assets["model"]))[2]


@pytest.fixture(autouse=True)
def restore_environment():
    """Undo environment changes a test's in-process run leaves behind.

    TrainingArguments(bf16=True) exports ACCELERATE_MIXED_PRECISION=bf16, and accelerate's state exports rank
    variables; left in place they would silently switch later runs (and their subprocesses) to bf16.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def train_argv(assets, output_dir, *extra, dataset=None):
    """Flags for a short CPU run on the tiny assets; `extra` flags come last and win."""
    return [
        "--model_name_or_path", assets["model"],
        "--dataset_name", dataset or assets["dataset"],
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "2e-3",
        "--num_train_epochs", "1",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ]


# The multi-process tests launch Open MPI ranks; without mpirun they are skipped, as README.md says.
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (apt-get install openmpi-bin)")


def launch_command(world_size, script, *args):
    """gaudi_spawn.py launching `script` on `world_size` Open MPI ranks (on CPU), with a free rendezvous port:
    the default one may be held by another run on the same machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, str(REPO_ROOT / "gaudi_spawn.py"), "--world_size", str(world_size), "--use_mpi",
            "--master_port", str(port), str(script), *args]


HABANA_DOUBLE = TESTS_DIR / "habana_double"
# Launcher and device variables that would change how accelerate or optimum-habana set up a process.
LAUNCHER_VARIABLE_PREFIXES = ("PT_HPU_", "HABANA_", "OMPI_", "PMI_", "MV2_", "ACCELERATE_", "FSDP_")
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def habana_double_env(hf_home=None) -> dict:
    """The environment of a subprocess that imports optimum.habana through the habana_frameworks TEST DOUBLE
    (tests/habana_double/README.md): this one less launcher and device variables, the double first on PYTHONPATH (with
    the torchvision stub where torchvision cannot be found), this interpreter's folder first on PATH (optimum-habana
    runs `pip list` on import), offline, no bytecode written into the double. `hf_home`: another Hugging Face home
    (e.g. one holding a Gaudi config), in place of the session's."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(LAUNCHER_VARIABLE_PREFIXES) and name not in LAUNCHER_VARIABLES}
    paths = [str(HABANA_DOUBLE)]
    if importlib.util.find_spec("torchvision") is None:
        paths.append(str(HABANA_DOUBLE / "torchvision_stub"))  # optimum-habana's GLM-4V port imports it
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1")
    if hf_home is not None:
        env.update(hf_cache_environment(hf_home))
    return env


def local_ranks_env(world_size: int) -> dict:
    """The variables that make `world_size` processes started by hand (not by a launcher) one torch.distributed job
    on this machine, at a free rendezvous port; none for one process."""
    if world_size <= 1:
        return {}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def run_training(argv):
    """The training path exactly as the command line takes it (`cli` minus the exit code): the trainer."""
    import run_lora_vlm

    return run_lora_vlm.main(run_lora_vlm.parse_args(argv))


def script_args(*flags, dataset="in-memory", output_dir="unused-output-dir"):
    """The script's parsed and settled arguments for these flags (no model or data is read)."""
    import run_lora_vlm

    return run_lora_vlm.parse_args(
        ["--model_name_or_path", "unused-model", "--dataset_name", dataset, "--output_dir", str(output_dir), *flags]
    )


def make_collator(processor, data_args, columns, image_base_dir=None, family="gemma3", skipped_rows=None):
    """The training collator `main` builds, for a dataset with these columns."""
    import run_lora_vlm as rlv

    schema = rlv.detect_schema(list(columns), data_args)
    encoder = rlv.ChatEncoder(processor, rlv.MODEL_FAMILIES[family], schema, data_args, image_base_dir)
    return rlv.VisionChatCollator(encoder, data_args, skipped_rows or rlv.SkippedRows(None, data_args.invalid_rows))


def collate_split(processor, args, raw=None, split="train", family="gemma3"):
    """(collator, batch of every row of `split` in order), through the script's data path: `raw` (a DatasetDict)
    in place of loading --dataset_name, or the data that flag names when `raw` is None."""
    import run_lora_vlm as rlv

    if raw is None:
        splits, _, image_base_dir = rlv.load_data(args.data, args.training, None)
    else:
        splits, image_base_dir = rlv.prepare_splits(raw, args.data, args.training), None
    rows = splits[split]
    collator = make_collator(processor, args.data, rows.dataset.column_names, image_base_dir, family)
    return collator, collator([rows[i] for i in range(len(rows))])


def run_builder_cli(main, *argv) -> list[str]:
    """Run a tiny builder's command line in this process (importing torch again would cost more than the build);
    returns the lines it printed."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(list(argv))
    return printed.getvalue().splitlines()


def trained_runs(tokenizer, input_ids, labels) -> list[str]:
    """A row's decoded runs of consecutive trained tokens (labels != -100): one per assistant turn."""
    positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    runs = []
    for position in positions:
        if runs and position == runs[-1][-1] + 1:
            runs[-1].append(position)
        else:
            runs.append([position])
    return [tokenizer.decode(input_ids[run]) for run in runs]


def batch_trained_texts(tokenizer, batch) -> list[list[str]]:
    """Every row's trained runs (see `trained_runs`)."""
    return [trained_runs(tokenizer, ids, labels) for ids, labels in zip(batch["input_ids"], batch["labels"])]


def decoded_inputs(tokenizer, batch) -> list[str]:
    """Every row's input as text, padding left out."""
    return [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
