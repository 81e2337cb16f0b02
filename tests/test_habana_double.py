"""optimum-habana on CPU through the ``habana_frameworks`` TEST DOUBLE (tests/habana_double): tests of the double
and of the library through it, not of the product (marker ``habana_double``; tests/habana_double/README.md).

Every scenario runs in a subprocess whose PYTHONPATH starts with tests/habana_double:
importing optimum.habana patches transformers globally, and the double must never
leak into other tests (nor be needed by the product).

Run directly for debugging:
    PATH=$(dirname $(which python)):$PATH PYTHONPATH=tests/habana_double \
        python tests/test_habana_double.py cpu|gaudi_flags /tmp/out.json
"""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import habana_double_env

pytestmark = pytest.mark.habana_double

HERE = Path(__file__).resolve().parent
DOUBLE = HERE / "habana_double"
TORCHVISION_STUB = DOUBLE / "torchvision_stub"

# The command line the product passes on Gaudi (gaudi_config_name swapped for a local file when it must load).
GAUDI_FLAGS = (
    "--use_habana --use_lazy_mode --gaudi_config_name Habana/gpt2 --bf16 --gradient_checkpointing "
    "--report_to tensorboard --do_train --do_eval --output_dir {out}"
)


# The name test_gaudi_gemma3_attention.py imports it by.
_subprocess_env = habana_double_env


def _run_scenario(name, tmp_path_factory):
    out = tmp_path_factory.mktemp(name) / "result.json"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), name, str(out)],
        cwd=str(HERE.parent),
        env=habana_double_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"scenario {name!r} failed (rc={proc.returncode})\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    return _run_scenario("cpu", tmp_path_factory)


@pytest.fixture(scope="module")
def gaudi_flags(tmp_path_factory):
    return _run_scenario("gaudi_flags", tmp_path_factory)


# --------------------------------------------------------------------------- tests


def test_double_does_not_leak_into_this_process():
    """Only the scenarios' subprocesses have the double on their path: no module of this process comes from it."""
    assert str(DOUBLE) not in sys.path
    from_double = [name for name, module in sys.modules.items()
                   if str(DOUBLE) in str(getattr(module, "__file__", None) or "")]
    assert from_double == []


def test_import_uses_the_double(cpu):
    assert cpu["double_file"].startswith(str(DOUBLE))
    assert cpu["imported"] == ["GaudiConfig", "GaudiTrainer", "GaudiTrainingArguments"]


def test_use_habana_false_needs_use_cpu(cpu):
    assert "No device has been set" in cpu["no_device_error"]


def test_gaudi_flags_parse(cpu):
    ns = cpu["parsed_namespace"]
    assert ns == {
        "use_habana": True,
        "use_lazy_mode": True,
        "gaudi_config_name": "Habana/gpt2",
        "bf16": True,
        "gradient_checkpointing": True,
        "report_to": "tensorboard",
        "do_train": True,
        "do_eval": True,
        "unparsed": [],
    }
    # __post_init__ -> self.device -> _setup_devices -> GaudiConfig.from_pretrained("Habana/gpt2"): needs the Hub.
    assert cpu["hub_gaudi_config_error"]["type"] == "OSError"


def test_cpu_lora_training(cpu):
    t = cpu["train"]
    assert t["device"] == "cpu"
    assert t["global_step"] == 3
    assert len(t["losses"]) == 3 and all(math.isfinite(x) for x in t["losses"])
    assert math.isfinite(t["eval_loss"])
    assert t["lora_changed"] == t["lora_total"] > 0
    assert t["base_unchanged"]
    # compute_loss_func gets the label count of the whole gradient-accumulation window
    # (2 micro-batches x 2 rows x 12 labels) while training, and None in evaluate().
    assert set(t["num_items_train"]) == {48}
    assert t["num_items_eval"] == [None, None]
    assert {"adapter_model.safetensors", "adapter_config.json", "gaudi_config.json"} <= set(t["saved_files"])
    # GaudiTrainer.log() always asks the HPU for memory stats; the double answers zeros.
    assert t["memory_logged"] == [0.0] * len(t["memory_logged"]) and t["memory_logged"]
    assert t["calls"].get("hpu.memory_stats", 0) >= 4
    assert "core.mark_step" not in t["calls"]  # no lazy mode, no mark_step
    assert t["init_calls"] == []


def test_lazy_mode_training_records_mark_step(cpu):
    t = cpu["lazy_train"]
    assert t["device"] == "cpu" and t["global_step"] == 3
    assert all(math.isfinite(x) for x in t["losses"])
    assert t["init_calls"] == ["hpu.disable_dynamic_shape"]  # GaudiTrainer.__init__, use_dynamic_shapes=False
    # one mark_step after every micro-batch (GA=2) and one after every optimizer step
    assert t["train_mark_steps"] == 3 * (2 + 1)
    assert all("optimum/habana/transformers/trainer.py" in c for c in t["mark_step_callers"])


def test_fused_sdpa_computes_on_cpu_and_hpu_graphs_refuse(cpu):
    # Zero queries and keys weigh every visible key alike: causal, the first query sees the first value, the second
    # the mean of both. (test_gaudi_gemma3_attention.py checks the stand-in against torch case by case.)
    assert cpu["fused_sdpa"] == [[[[1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]]]]
    assert cpu["wrap_in_hpu_graph"].startswith("HPUUnavailableError")


def test_adapt_transformers_to_gaudi(gaudi_flags):
    g = gaudi_flags
    assert g["gemma3_cls"] == "GaudiGemma3ForConditionalGeneration"
    assert g["gemma3_causal_cls"] == "GaudiGemma3ForCausalLM"


def test_gaudi_flags_build_on_cpu_with_local_gaudi_config(gaudi_flags):
    a = gaudi_flags["args"]
    assert a["device"] == "cpu"  # no torch.hpu -> accelerate falls back to CPU
    assert a["use_habana"] and a["use_lazy_mode"] and a["bf16"] and a["gradient_checkpointing"]
    assert a["half_precision_backend"] == "hpu_amp"
    assert "eager mode should be enabled using PT_HPU_LAZY_MODE=0" in gaudi_flags["eager_without_env_error"]
    assert gaudi_flags["eager_with_env_device"] == "cpu"


def test_gaudi_gemma3_vlm_lora_trains_on_cpu(gaudi_flags):
    v = gaudi_flags["vlm"]
    assert v["model_cls"] == "GaudiGemma3ForConditionalGeneration"
    assert v["global_step"] == 2 and all(math.isfinite(x) for x in v["losses"])
    assert v["lora_changed"] == v["lora_total"] > 0
    assert v["calls"]["core.mark_step"] > 0  # GaudiGemma3TextModel.forward(lazy_mode=True) marks steps too


# --------------------------------------------------------------------------- scenarios (run in the subprocess)


def _tiny_gemma3_text_config(**kw):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=8,
        **kw,
    )


def _stack_collate(batch):
    import torch

    return {k: torch.stack([x[k] for x in batch]) for k in batch[0]}


def _make_loss_fn(seen):
    import torch

    def loss_fn(outputs, labels, num_items_in_batch=None):
        seen.append(None if num_items_in_batch is None else int(num_items_in_batch))
        logits = outputs.logits[:, :-1].float()
        shifted = labels[:, 1:].to(logits.device)
        total = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return total / (num_items_in_batch if num_items_in_batch is not None else (shifted != -100).sum())

    return loss_fn


def _train_lora_causal_lm(out_dir, **arg_overrides):
    """3 optimizer steps (GA=2) of a LoRA-wrapped tiny random Gemma3ForCausalLM through GaudiTrainer."""
    import collections

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM

    import habana_frameworks
    from optimum.habana import GaudiConfig, GaudiTrainer, GaudiTrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(
        Gemma3ForCausalLM(_tiny_gemma3_text_config()),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(8):
        ids = torch.randint(0, 64, (12,), generator=gen)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})

    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    seen = []
    habana_frameworks.reset()
    args = GaudiTrainingArguments(
        output_dir=out_dir,
        max_steps=3,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        **arg_overrides,
    )
    trainer = GaudiTrainer(
        model=model,
        gaudi_config=GaudiConfig(),
        args=args,
        train_dataset=data,
        eval_dataset=data[:4],
        data_collator=_stack_collate,
        compute_loss_func=_make_loss_fn(seen),
    )
    init_calls = [c[0] for c in habana_frameworks.CALLS]
    habana_frameworks.reset()
    result = trainer.train()
    n_train_calls = len(seen)
    train_mark_steps = habana_frameworks.calls("core.mark_step")
    metrics = trainer.evaluate()
    trainer.save_model(out_dir)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "device": args.device.type,
        "global_step": result.global_step,
        "losses": [h["loss"] for h in logs],
        "memory_logged": [h["memory_allocated (GB)"] for h in trainer.state.log_history],
        "eval_loss": metrics["eval_loss"],
        "num_items_train": seen[:n_train_calls],
        "num_items_eval": seen[n_train_calls:],
        "lora_total": len(lora_before),
        "lora_changed": sum(
            not torch.equal(p.detach(), lora_before[n]) for n, p in model.named_parameters() if n in lora_before
        ),
        "base_unchanged": all(
            torch.equal(p.detach(), base_before[n]) for n, p in model.named_parameters() if n in base_before
        ),
        "saved_files": sorted(os.listdir(out_dir)),
        "train_mark_steps": len(train_mark_steps),
        "mark_step_callers": sorted({c[2]["caller"].split("site-packages/")[-1].rsplit(":", 1)[0] for c in train_mark_steps}),
        "init_calls": init_calls,
        "calls": dict(collections.Counter(c[0] for c in habana_frameworks.CALLS)),
    }


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we report the type
        return f"{type(e).__name__}: {e}"
    return None


def scenario_cpu(work):
    """Import, parse, and GaudiTrainer on CPU without adapt_transformers_to_gaudi."""
    import optimum.habana
    from optimum.habana import GaudiConfig, GaudiTrainer, GaudiTrainingArguments  # noqa: F401
    from transformers import HfArgumentParser

    import habana_frameworks

    res = {
        "double_file": habana_frameworks.__file__,
        "imported": sorted(n for n in ("GaudiConfig", "GaudiTrainer", "GaudiTrainingArguments") if hasattr(optimum.habana, n)),
        "no_device_error": _error(
            lambda: GaudiTrainingArguments(output_dir=work, use_habana=False, use_lazy_mode=False, report_to="none")
        ),
    }

    argv = GAUDI_FLAGS.format(out=os.path.join(work, "flags")).split()
    parser = HfArgumentParser(GaudiTrainingArguments)
    ns, unparsed = parser.parse_known_args(argv)
    res["parsed_namespace"] = {
        k: getattr(ns, k)
        for k in ("use_habana", "use_lazy_mode", "gaudi_config_name", "bf16", "gradient_checkpointing", "report_to", "do_train", "do_eval")
    }
    res["parsed_namespace"]["unparsed"] = unparsed
    try:
        parser.parse_args_into_dataclasses(argv)
        res["hub_gaudi_config_error"] = None
    except Exception as e:  # noqa: BLE001
        res["hub_gaudi_config_error"] = {"type": type(e).__name__, "msg": str(e)[:300]}

    res["train"] = _train_lora_causal_lm(
        os.path.join(work, "train"), use_habana=False, use_lazy_mode=False, use_cpu=True
    )
    # use_cpu wins over use_habana in _setup_devices, so adapt_transformers_to_gaudi is not called,
    # but GaudiTrainer still runs its lazy-mode code (htcore.mark_step, dynamic shapes).
    res["lazy_train"] = _train_lora_causal_lm(
        os.path.join(work, "lazy"), use_habana=True, use_lazy_mode=True, use_cpu=True
    )

    import torch
    from habana_frameworks.torch.hpex.kernels import FusedSDPA
    from habana_frameworks.torch.hpu import wrap_in_hpu_graph

    zeros, values = torch.zeros(1, 1, 2, 4), torch.tensor([[[[1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0]]]])
    res["fused_sdpa"] = FusedSDPA.apply(zeros, zeros, values, None, 0.0, True, None).tolist()
    res["wrap_in_hpu_graph"] = _error(lambda: wrap_in_hpu_graph(torch.nn.Linear(2, 2)))
    return res


def _ensure_torchvision():
    """optimum-habana's GLM-4V port imports torchvision: the real one, else the import-only stub (habana_double_env
    puts it on the path where torchvision cannot be found; here it also replaces one that cannot be imported)."""
    try:
        import torchvision.transforms  # noqa: F401
    except Exception:  # noqa: BLE001 - e.g. a CUDA wheel next to a CPU torch
        for m in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[m]
        sys.path.insert(0, str(TORCHVISION_STUB))
    import torchvision

    return "stub" if getattr(torchvision, "IS_TEST_DOUBLE", False) else "real"


def _train_lora_vlm(out_dir):
    import collections

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3Config, SiglipVisionConfig
    from transformers.models.gemma3 import modeling_gemma3

    import habana_frameworks
    from optimum.habana import GaudiConfig, GaudiTrainer, GaudiTrainingArguments

    args = GaudiTrainingArguments(
        output_dir=out_dir,
        use_habana=True,
        use_lazy_mode=True,
        bf16=True,
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    torch.manual_seed(0)
    text = _tiny_gemma3_text_config().to_dict()
    text["vocab_size"] = 80
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=7
    ).to_dict()
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=77, eoi_token_index=78, image_token_index=79
    )
    model = modeling_gemma3.Gemma3ForConditionalGeneration(config)  # resolved after adapt_transformers_to_gaudi()
    model_cls = type(model).__name__
    # A fresh Gemma3MultiModalProjector starts at zero, which would cut the vision tower off from the loss.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))

    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(4):
        ids = torch.cat([torch.tensor([2, 77]), torch.full((4,), 79), torch.tensor([78]), torch.randint(3, 70, (9,), generator=gen)])
        labels = ids.clone()
        labels[:7] = -100
        data.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "token_type_ids": (ids == 79).long(),
                "labels": labels,
                "pixel_values": torch.randn(3, 28, 28, generator=gen),
            }
        )
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = GaudiTrainer(
        model=model,
        gaudi_config=GaudiConfig(),
        args=args,
        train_dataset=data,
        data_collator=_stack_collate,
        compute_loss_func=_make_loss_fn([]),
    )
    habana_frameworks.reset()
    result = trainer.train()
    return {
        "model_cls": model_cls,
        "global_step": result.global_step,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "lora_total": len(lora_before),
        "lora_changed": sum(
            not torch.equal(p.detach(), lora_before[n]) for n, p in model.named_parameters() if n in lora_before
        ),
        "calls": dict(collections.Counter(c[0] for c in habana_frameworks.CALLS)),
    }


def scenario_gaudi_flags(work):
    """The Gaudi code path (use_habana=True): adapt_transformers_to_gaudi, full flag set, Gemma 3 port."""
    res = {"torchvision": _ensure_torchvision()}
    from optimum.habana import GaudiTrainingArguments
    from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi
    from transformers import HfArgumentParser
    from transformers.models.gemma3 import modeling_gemma3

    adapt_transformers_to_gaudi()
    res["gemma3_cls"] = modeling_gemma3.Gemma3ForConditionalGeneration.__name__
    res["gemma3_causal_cls"] = modeling_gemma3.Gemma3ForCausalLM.__name__

    gaudi_config_dir = os.path.join(work, "gaudi_config")
    os.makedirs(gaudi_config_dir)
    with open(os.path.join(gaudi_config_dir, "gaudi_config.json"), "w") as f:
        json.dump({"use_torch_autocast": True, "use_fused_adam": True, "use_fused_clip_norm": True}, f)
    argv = GAUDI_FLAGS.format(out=os.path.join(work, "flags")).replace("Habana/gpt2", gaudi_config_dir).split()
    (args,) = HfArgumentParser(GaudiTrainingArguments).parse_args_into_dataclasses(argv)
    res["args"] = {
        "device": args.device.type,
        **{k: getattr(args, k) for k in ("use_habana", "use_lazy_mode", "bf16", "gradient_checkpointing", "half_precision_backend")},
    }

    eager = dict(output_dir=os.path.join(work, "eager"), use_habana=True, use_lazy_mode=False, report_to="none")
    res["eager_without_env_error"] = _error(lambda: GaudiTrainingArguments(**eager))
    os.environ["PT_HPU_LAZY_MODE"] = "0"
    res["eager_with_env_device"] = GaudiTrainingArguments(**eager).device.type
    del os.environ["PT_HPU_LAZY_MODE"]

    res["vlm"] = _train_lora_vlm(os.path.join(work, "vlm"))
    return res


if __name__ == "__main__":
    scenario, out_path = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as work_dir:
        result = {"cpu": scenario_cpu, "gaudi_flags": scenario_gaudi_flags}[scenario](work_dir)
    Path(out_path).write_text(json.dumps(result, indent=1, default=str))
