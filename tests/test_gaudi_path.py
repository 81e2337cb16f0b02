# Licensed under the Apache License, Version 2.0 (the "License").
"""The Gaudi code path of run_lora_vlm.py, run on CPU through the habana_frameworks TEST DOUBLE.

Each case runs this file as a script in a subprocess whose PYTHONPATH starts with tests/habana_double
(importing optimum.habana patches transformers globally, so it must not leak into other tests). The
Gaudi config `Habana/gpt2` of the seed commands is served from a local Hugging Face cache made here,
so the seed flags are used unchanged and offline.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DOUBLE = HERE / "habana_double"
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
# What we believe Habana/gpt2's gaudi_config.json holds (the Hub is unreachable here).
HABANA_GPT2_CONFIG = {"use_fused_adam": True, "use_fused_clip_norm": True, "use_torch_autocast": True}


def fake_hub_cache(root: Path) -> Path:
    snapshot = root / "hub" / "models--Habana--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "gaudi_config.json").write_text(json.dumps(HABANA_GPT2_CONFIG))
    (root / "hub" / "models--Habana--gpt2" / "refs").mkdir(exist_ok=True)
    (root / "hub" / "models--Habana--gpt2" / "refs" / "main").write_text("0" * 40)
    return root


def run_case(tmp_path, mode, argv, lazy_env="1"):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PT_HPU_", "OMPI_", "PMI_")) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    paths = [str(DOUBLE)]
    if importlib.util.find_spec("torchvision") is None:
        paths.append(str(DOUBLE / "torchvision_stub"))  # optimum-habana's GLM-4V port imports it
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])  # its `pip list` check
    env.update(HF_HOME=str(fake_hub_cache(tmp_path / "hf")), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if lazy_env is not None:
        env["PT_HPU_LAZY_MODE"] = lazy_env
    out = tmp_path / f"{mode}.json"
    result = subprocess.run([sys.executable, __file__, mode, str(out), *argv], env=env, cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and out.exists(), result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(out.read_text())


def test_seed_commands_parse_into_gaudi_training_arguments(tmp_path):
    for flags in (SEED_SINGLE_CARD, SEED_EIGHT_CARDS):
        parsed = run_case(tmp_path, "parse", SEED_MODEL_FLAGS + flags)
        assert parsed["class"] == "GaudiTrainingArguments"
        assert parsed["use_habana"] and parsed["use_lazy_mode"] and parsed["gaudi_config_name"] == "Habana/gpt2"
        assert parsed["bf16"] and parsed["gradient_checkpointing"] and parsed["lora_rank"] == 16
        assert parsed["padding_strategy"] == "bucket"  # lazy mode: a few fixed shapes, not one per batch
        assert parsed["hpu_model_inputs"] == {
            "use_flash_attention": False, "flash_attention_recompute": False, "flash_attention_causal_mask": False,
            "flash_attention_fast_softmax": False, "lazy_mode": True,
        }
    assert parsed["report_to"] == ["tensorboard"] and parsed["gradient_accumulation_steps"] == 2


def test_fused_attention_flags_reach_the_model_inputs(tmp_path):
    parsed = run_case(tmp_path, "parse", SEED_MODEL_FLAGS + SEED_SINGLE_CARD + [
        "--attn_implementation", "gaudi_fused_sdpa", "--flash_attention_recompute", "--flash_attention_causal_mask"])
    assert parsed["hpu_model_inputs"] == {
        "use_flash_attention": True, "flash_attention_recompute": True, "flash_attention_causal_mask": True,
        "flash_attention_fast_softmax": False, "lazy_mode": True,
    }
    assert parsed["attn_implementation"] == "gaudi_fused_sdpa"


@pytest.mark.parametrize(
    "lazy_env, extra, expected",
    [
        ("0", ["--use_lazy_mode"], "PT_HPU_LAZY_MODE=0 asks for eager mode but --use_lazy_mode is True: drop --use_lazy_mode"),
        (None, ["--use_lazy_mode"], "PT_HPU_LAZY_MODE is unset"),
    ],
)
def test_lazy_mode_and_environment_must_agree(tmp_path, lazy_env, extra, expected):
    flags = [f for f in SEED_SINGLE_CARD if f != "--use_lazy_mode"] + extra
    parsed = run_case(tmp_path, "parse", SEED_MODEL_FLAGS + flags, lazy_env=lazy_env)
    assert expected in parsed["error"]


def test_eager_environment_without_the_flag_runs_eager(tmp_path):
    flags = [f for f in SEED_SINGLE_CARD if f != "--use_lazy_mode"]
    parsed = run_case(tmp_path, "parse", SEED_MODEL_FLAGS + flags, lazy_env="0")
    assert parsed["use_lazy_mode"] is False and parsed["padding_strategy"] == "longest"
    assert parsed["hpu_model_inputs"]["lazy_mode"] is False


def test_short_cpu_run_trains_through_gaudi_trainer_and_saves_the_adapter(tmp_path, assets):
    flags = [f for f in SEED_SINGLE_CARD if f not in ("--gradient_checkpointing", "./output_gemma3")]
    flags[flags.index("--output_dir") + 1:flags.index("--output_dir") + 1] = [str(tmp_path / "out")]
    run = run_case(tmp_path, "train", [
        "--model_name_or_path", assets["model"], "--dataset_name", assets["dataset"], *flags,
        # Two accumulated micro-batches of unequal length (longest padding), 3 optimizer steps.
        "--use_cpu", "--max_steps", "3", "--gradient_accumulation_steps", "2", "--padding_strategy", "longest",
        "--max_eval_samples", "4", "--report_to", "none", "--save_strategy", "no",
    ])
    assert "GaudiTrainer" in run["trainer_classes"]
    assert run["global_step"] == 3 and all(x == x for x in run["losses"])
    assert run["hpu_model_inputs"]["lazy_mode"] is True and "use_flash_attention" in run["batch_keys"]
    # The window's trained-token count reaches the loss for every micro-batch, despite unequal lengths.
    assert len(run["num_items_in_batch"]) == 6 and None not in run["num_items_in_batch"]
    assert run["calls"]["core.mark_step"] >= 6 and run["calls"]["hpex.optimizers.FusedAdamW"] == 1
    assert {"adapter_model.safetensors", "adapter_config.json", "gaudi_config.json"} <= set(run["saved_files"])
    assert run["reloaded_adapter"]


# ------------------------------------------------------------------------------------------------
# The subprocess side: python test_gaudi_path.py MODE OUT_JSON ARGV...


def _parse_case(argv):
    import run_lora_vlm

    try:
        model_args, data_args, lora_args, _, _, training_args = run_lora_vlm.parse_args(argv)
    except ValueError as e:
        return {"error": str(e)}
    return {
        "class": type(training_args).__name__,
        "use_habana": training_args.use_habana,
        "use_lazy_mode": training_args.use_lazy_mode,
        "gaudi_config_name": training_args.gaudi_config_name,
        "bf16": training_args.bf16,
        "gradient_checkpointing": training_args.gradient_checkpointing,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "report_to": training_args.report_to,
        "lora_rank": lora_args.lora_rank,
        "padding_strategy": data_args.padding_strategy,
        "attn_implementation": model_args.attn_implementation,
        "hpu_model_inputs": run_lora_vlm.hpu_model_inputs(training_args),
    }


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
    trainer = run_lora_vlm.main(argv)
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
    sys.path.insert(0, str(HERE.parent))
    mode, out_path, case_argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    result = {"parse": _parse_case, "train": _train_case}[mode](case_argv)
    Path(out_path).write_text(json.dumps(result))
