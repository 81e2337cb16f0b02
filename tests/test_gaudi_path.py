# Licensed under the Apache License, Version 2.0 (the "License").
"""The Gaudi code path of run_lora_vlm.py, run on CPU through the habana_frameworks TEST DOUBLE.

All cases run in one subprocess (this file as a script) whose PYTHONPATH starts with tests/habana_double:
importing optimum.habana patches transformers globally, so it must not leak into other tests, and importing it
costs more than every case together. Each case sets PT_HPU_LAZY_MODE as its own process would. The Gaudi config
`Habana/gpt2` of the seed commands is served from a local Hugging Face cache made here, so the seed flags are
used unchanged and offline.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import SEED_EIGHT_CARDS, SEED_MODEL_FLAGS, SEED_SINGLE_CARD, habana_double_env

# What we believe Habana/gpt2's gaudi_config.json holds (the Hub is unreachable here).
HABANA_GPT2_CONFIG = {"use_fused_adam": True, "use_fused_clip_norm": True, "use_torch_autocast": True}


def fake_hub_cache(root: Path) -> Path:
    snapshot = root / "hub" / "models--Habana--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "gaudi_config.json").write_text(json.dumps(HABANA_GPT2_CONFIG))
    (root / "hub" / "models--Habana--gpt2" / "refs").mkdir(exist_ok=True)
    (root / "hub" / "models--Habana--gpt2" / "refs" / "main").write_text("0" * 40)
    return root


# Each case: (kind, argv, PT_HPU_LAZY_MODE or None for unset). The training case runs before any other case
# that builds GaudiTrainingArguments, in a fresh process state, as a real run would; the others only parse.
SHORT_RUN_FLAGS = [f for f in SEED_SINGLE_CARD if f not in ("--gradient_checkpointing", "./output_gemma3")]
WITHOUT_LAZY_FLAG = [f for f in SEED_SINGLE_CARD if f != "--use_lazy_mode"]
CASES = {
    # --help with optimum-habana's GaudiTrainingArguments, whose help texts are rendered too.
    "help": ("help", ["--help"], None),
    # The modes that do not train, without --use_habana, where Habana's stack is installed. They run first: they
    # must not need optimum-habana's patches of transformers, which the training case installs for the process.
    "one question": ("cli", ["--predict_image", "IMAGE", "--predict_question", "Which bar is the tallest?"], None),
    "merge": ("cli", ["--merge_adapter", "--output_dir", "MERGED"], None),
    "short cpu run": ("train", None, "1"),
    "seed single card": ("parse", SEED_MODEL_FLAGS + SEED_SINGLE_CARD, "1"),
    "seed eight cards": ("parse", SEED_MODEL_FLAGS + SEED_EIGHT_CARDS, "1"),
    "fused attention": ("parse", SEED_MODEL_FLAGS + SEED_SINGLE_CARD + [
        "--attn_implementation", "gaudi_fused_sdpa", "--flash_attention_recompute", "--flash_attention_causal_mask"], "1"),
    "lazy flag, eager environment": ("parse", SEED_MODEL_FLAGS + WITHOUT_LAZY_FLAG + ["--use_lazy_mode"], "0"),
    "lazy flag, environment unset": ("parse", SEED_MODEL_FLAGS + WITHOUT_LAZY_FLAG + ["--use_lazy_mode"], None),
    "eager environment, no flag": ("parse", SEED_MODEL_FLAGS + WITHOUT_LAZY_FLAG, "0"),
    "vision tower": ("parse", SEED_MODEL_FLAGS + SEED_SINGLE_CARD + ["--train_vision_tower"], "1"),
    "vision tower, flag given": ("parse", SEED_MODEL_FLAGS + SEED_SINGLE_CARD + [
        "--train_vision_tower", "--ddp_find_unused_parameters", "False"], "1"),
}


@pytest.fixture(scope="module")
def results(assets, tmp_path_factory):
    """{case name: what the subprocess recorded}, for every case of CASES."""
    tmp_path = tmp_path_factory.mktemp("gaudi_path")
    train_flags = list(SHORT_RUN_FLAGS)
    train_flags[train_flags.index("--output_dir") + 1:train_flags.index("--output_dir") + 1] = [str(tmp_path / "out")]
    train_argv = [
        "--model_name_or_path", assets["model"], "--dataset_name", assets["dataset"], *train_flags,
        # Two accumulated micro-batches of unequal length (longest padding), 3 optimizer steps.
        "--use_cpu", "--max_steps", "3", "--gradient_accumulation_steps", "2", "--padding_strategy", "longest",
        "--max_eval_samples", "4", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
        # A pinned model commit must not be looked up in the Gaudi config's repository (Habana/gpt2).
        "--model_revision", "0123456789abcdef0123456789abcdef01234567",
    ]
    image = tmp_path / "chart.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    adapter = ["--model_name_or_path", assets["model"], "--adapter_path", str(untrained_adapter(assets, tmp_path / "adapter"))]
    placeholders = {"IMAGE": str(image), "MERGED": str(tmp_path / "merged")}
    cases = [{"name": name, "kind": kind, "lazy_env": lazy_env,
              "argv": train_argv if argv is None else
              (adapter if kind == "cli" else []) + [placeholders.get(arg, arg) for arg in argv]}
             for name, (kind, argv, lazy_env) in CASES.items()]
    (tmp_path / "cases.json").write_text(json.dumps(cases))

    env = habana_double_env(hf_home=fake_hub_cache(tmp_path / "hf"))
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, __file__, str(tmp_path / "cases.json"), str(out)], env=env,
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and out.exists(), result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(out.read_text())


def untrained_adapter(assets, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(assets["model"])
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


def case(results, name):
    """What case `name` recorded; a case that raised fails here with its traceback."""
    assert "traceback" not in results[name], results[name].get("traceback")
    return results[name]


SEED_HPU_INPUTS = {
    "use_flash_attention": False, "flash_attention_recompute": False, "flash_attention_causal_mask": False,
    "flash_attention_fast_softmax": False, "lazy_mode": True,
}


def test_help_renders_every_flag_with_gaudi_training_arguments(results):
    # Every help text, optimum-habana's included, goes through argparse's % formatting here.
    help_case = case(results, "help")
    assert help_case["exit_code"] == 0
    for flag in ("--use_habana", "--use_lazy_mode", "--gaudi_config_name", "--pan_and_scan", "--adapter_path"):
        assert flag in help_case["stdout"], flag


def test_seed_commands_parse_into_gaudi_training_arguments(results):
    for name in ("seed single card", "seed eight cards"):
        parsed = case(results, name)
        assert parsed["class"] == "GaudiTrainingArguments", name
        assert parsed["use_habana"] and parsed["use_lazy_mode"] and parsed["gaudi_config_name"] == "Habana/gpt2"
        assert parsed["bf16"] and parsed["gradient_checkpointing"] and parsed["lora_rank"] == 16
        assert parsed["padding_strategy"] == "bucket"  # lazy mode: a few fixed shapes, not one per batch
        assert parsed["hpu_model_inputs"] == SEED_HPU_INPUTS
    eight = case(results, "seed eight cards")
    assert eight["report_to"] == ["tensorboard"] and eight["gradient_accumulation_steps"] == 2
    assert case(results, "seed single card")["gradient_accumulation_steps"] == 1
    # Images are decoded in background workers (persistent) while the device computes: all cores but one, up to 4.
    single = case(results, "seed single card")
    assert single["loader"] == [min(4, single["cores"] - 1), single["cores"] > 1, True]


def test_fused_attention_flags_reach_the_model_inputs(results):
    parsed = case(results, "fused attention")
    assert parsed["hpu_model_inputs"] == {
        **SEED_HPU_INPUTS, "use_flash_attention": True, "flash_attention_recompute": True, "flash_attention_causal_mask": True,
    }
    assert parsed["attn_implementation"] == "gaudi_fused_sdpa"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("lazy flag, eager environment",
         "PT_HPU_LAZY_MODE=0 asks for eager mode but --use_lazy_mode is True: drop --use_lazy_mode"),
        ("lazy flag, environment unset", "PT_HPU_LAZY_MODE is unset"),
    ],
)
def test_lazy_mode_and_environment_must_agree(results, name, expected):
    assert expected in case(results, name)["error"]


def test_eager_environment_without_the_flag_runs_eager(results):
    parsed = case(results, "eager environment, no flag")
    assert parsed["use_lazy_mode"] is False and parsed["padding_strategy"] == "longest"
    assert parsed["hpu_model_inputs"]["lazy_mode"] is False


def test_vision_tower_training_lets_ddp_find_unused_parameters_unless_the_flag_says_otherwise(results):
    # GaudiTrainingArguments defaults the setting to False, not None: the script must still switch it on.
    assert case(results, "vision tower")["ddp_find_unused_parameters"] is True
    assert case(results, "vision tower, flag given")["ddp_find_unused_parameters"] is False


def test_one_question_and_merging_need_no_use_habana_where_the_stack_is_installed(results, tmp_path_factory):
    asked, merged = case(results, "one question"), case(results, "merge")
    assert asked["exit_code"] == 0 and asked["stdout"].count("\n") == 1, asked
    assert merged["exit_code"] == 0 and "model.safetensors" in merged["merged_files"], merged


def test_short_cpu_run_trains_through_gaudi_trainer_and_saves_the_adapter(results):
    run = case(results, "short cpu run")
    assert "GaudiTrainer" in run["trainer_classes"]
    assert run["global_step"] == 3
    assert len(run["losses"]) == 3 and all(math.isfinite(loss) for loss in run["losses"])
    assert run["hpu_model_inputs"]["lazy_mode"] is True and "use_flash_attention" in run["batch_keys"]
    # The window's trained-token count reaches the loss for every micro-batch, despite unequal lengths.
    assert len(run["num_items_in_batch"]) == 6 and None not in run["num_items_in_batch"]
    assert run["calls"]["core.mark_step"] >= 6 and run["calls"]["hpex.optimizers.FusedAdamW"] == 1
    assert {"adapter_model.safetensors", "adapter_config.json", "gaudi_config.json"} <= set(run["saved_files"])
    assert run["reloaded_adapter"]


# ------------------------------------------------------------------------------------------------
# The subprocess side: python test_gaudi_path.py CASES_JSON OUT_JSON


def _parse_case(argv):
    import run_lora_vlm

    try:
        args = run_lora_vlm.parse_args(argv)
    except ValueError as e:
        return {"error": str(e)}
    training_args = args.training
    return {
        "class": type(training_args).__name__,
        "use_habana": training_args.use_habana,
        "use_lazy_mode": training_args.use_lazy_mode,
        "gaudi_config_name": training_args.gaudi_config_name,
        "bf16": training_args.bf16,
        "gradient_checkpointing": training_args.gradient_checkpointing,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "report_to": training_args.report_to,
        "lora_rank": args.lora.lora_rank,
        "padding_strategy": args.data.padding_strategy,
        "attn_implementation": training_args.attn_implementation,
        "hpu_model_inputs": run_lora_vlm.hpu_model_inputs(training_args, run_lora_vlm.MODEL_FAMILIES["gemma3"]),
        "ddp_find_unused_parameters": training_args.ddp_find_unused_parameters,
        "loader": [training_args.dataloader_num_workers, training_args.dataloader_persistent_workers,
                   training_args.dataloader_pin_memory],
        "cores": len(os.sched_getaffinity(0)),
    }


def _cli_case(argv):
    import contextlib
    import io

    import run_lora_vlm

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exit_code = run_lora_vlm.cli(argv)
    merged = Path(argv[argv.index("--output_dir") + 1], "merged") if "--output_dir" in argv else None
    return {"exit_code": exit_code, "stdout": stdout.getvalue(),
            "merged_files": sorted(p.name for p in merged.iterdir()) if merged and merged.is_dir() else []}


def _help_case(argv):
    import contextlib
    import io

    import run_lora_vlm

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            run_lora_vlm.cli(argv)
        except SystemExit as e:  # argparse ends --help this way
            return {"exit_code": e.code, "stdout": stdout.getvalue()}
    return {"exit_code": None, "stdout": stdout.getvalue()}


def _train_case(argv):
    import collections

    import habana_frameworks
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    import run_lora_vlm

    assert habana_frameworks.IS_TEST_DOUBLE
    seen_items, batch_keys = [], set()
    original_loss, original_pad = run_lora_vlm.TrainingLossMonitor.loss, run_lora_vlm.VisionChatCollator.pad

    def loss(self, outputs, labels, num_items_in_batch=None):
        if outputs["logits"].requires_grad:
            seen_items.append(None if num_items_in_batch is None else int(num_items_in_batch))
        return original_loss(self, outputs, labels, num_items_in_batch)

    def pad(self, *args, **kwargs):
        batch = original_pad(self, *args, **kwargs)
        batch_keys.update(batch)
        return batch

    run_lora_vlm.TrainingLossMonitor.loss, run_lora_vlm.VisionChatCollator.pad = loss, pad
    try:
        trainer = run_lora_vlm.main(run_lora_vlm.parse_args(argv))
    finally:
        run_lora_vlm.TrainingLossMonitor.loss, run_lora_vlm.VisionChatCollator.pad = original_loss, original_pad
    output_dir = Path(trainer.args.output_dir)
    base = AutoModelForImageTextToText.from_pretrained(argv[argv.index("--model_name_or_path") + 1])
    reloaded = PeftModel.from_pretrained(base, str(output_dir))
    return {
        "trainer_classes": [c.__name__ for c in type(trainer).__mro__],
        "global_step": trainer.state.global_step,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "hpu_model_inputs": trainer.data_collator.extra_model_inputs,
        "batch_keys": sorted(batch_keys),
        "num_items_in_batch": seen_items,
        "calls": collections.Counter(name for name, _, _ in habana_frameworks.calls()),
        "saved_files": sorted(p.name for p in output_dir.iterdir()),
        "reloaded_adapter": any("lora_" in n for n, _ in reloaded.named_parameters()),
    }


if __name__ == "__main__":
    import traceback

    cases_path, out_path = sys.argv[1], sys.argv[2]
    recorded = {}
    for spec in json.loads(Path(cases_path).read_text()):
        os.environ.pop("PT_HPU_LAZY_MODE", None)
        if spec["lazy_env"] is not None:
            os.environ["PT_HPU_LAZY_MODE"] = spec["lazy_env"]
        try:
            recorded[spec["name"]] = {"parse": _parse_case, "train": _train_case, "cli": _cli_case,
                                     "help": _help_case}[spec["kind"]](spec["argv"])
        except Exception:  # recorded for that case's test; the other cases still run
            recorded[spec["name"]] = {"traceback": traceback.format_exc()}
    Path(out_path).write_text(json.dumps(recorded))
