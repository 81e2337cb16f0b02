# Licensed under the Apache License, Version 2.0 (the "License").
"""On Gaudi, Gemma 3 trains and generates with the attention of transformers' Gemma 3 (issues 14 and 22).

optimum-habana's Gemma 3 port ignores token_type_ids and builds its own masks; run_lora_vlm.py hands it
the reference masks (`use_gemma3_reference_attention`). Checked here:

* in this process: the masks equal those transformers' Gemma 3 builds itself (captured from its own
  forward), they build on the meta device (no value is read back, no data-dependent shape), the
  fused-attention flags that would change the result are refused, and --use_hpu_graphs_for_inference wraps
  the model generate() runs;
* for the same batch (images, right padding, rows longer than the sliding window), the same weights and
  grouped-query heads (4 query over 2 key/value heads), the Gaudi-patched model gives the logits, loss and
  LoRA gradients of upstream transformers' Gemma 3 with token_type_ids, with fused attention off and on, in
  float32 (atol 1e-5) and in bf16 autocast (within what bf16 rounding moves upstream's own results); without
  the product's masks, or with --flash_attention_causal_mask, it does not;
* greedy generation through optimum-habana's generate() with the product's HPU options (lazy mode, static
  shapes) gives upstream's tokens and scores on left-padded prompts with images, longer than the sliding window;
* on Gaudi the image placeholder mask skips upstream's boolean-index count (a host sync every forward) and the
  language model gets identical embeddings; the double's FusedSDPA refuses a mask in another dtype than q's.

The reference runs in this process (optimum.habana is never imported here); the port in ONE subprocess with
the habana_frameworks TEST DOUBLE first on PYTHONPATH (its FusedSDPA is a CPU stand-in, see
tests/habana_double/README.md), after adapt_transformers_to_gaudi() and before the model is built, as on Gaudi.

Run the subprocess part directly for debugging:
    PATH=$(dirname $(which python)):$PATH PYTHONPATH=tests/habana_double:. \
        python tests/test_gaudi_gemma3_attention.py WORK_DIR   # with WORK_DIR/case.pt from _reference_case
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import run_lora_vlm

HERE = Path(__file__).resolve().parent
ATOL = 1e-5
# bf16 autocast rounds every matmul's inputs and outputs to 8 significant bits; the port and upstream round in different
# places (the port multiplies in its own Matmul modules, the fused stand-in accumulates in float32), so they can
# differ by as much as bf16 rounding moves either one. The yardstick is measured, not guessed: how far upstream's own
# bf16 results lie from its float32 ones on the same batch (`bf16_rounding`). The port may differ from upstream by at
# most BF16_SLACK times that; a wrong attention pattern differs by far more (checked below).
BF16_SLACK = 1.5
QUERY_HEADS, KV_HEADS = 4, 2
PROMPT_BUCKET = 24  # generation prompts are left-padded to this length
NEW_TOKENS = 6  # more than SLIDING_WINDOW: decoding steps meet the window too
# Far above ATOL: what a changed attention pattern does to this tiny model's logits.
CLEARLY_DIFFERENT = 1e-3
# Shorter than an image (MM_TOKENS_PER_IMAGE = 4 tokens) and than every row: the window really masks,
# and an image's two-way attention must reach past it.
SLIDING_WINDOW = 3


# --------------------------------------------------------------------------- in this process


def _tiny_upstream_gemma3(sliding_window=SLIDING_WINDOW):
    """A tiny transformers Gemma 3 (no Gaudi port involved in this process), eager attention."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=7)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          boi_token_index=77, eoi_token_index=78, image_token_index=79)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config).eval()


def test_masks_equal_the_ones_transformers_gemma3_builds():
    model = _tiny_upstream_gemma3()
    image = [79] * 4
    rows = [
        # two images apart, a text tail longer than the window
        [2, 10, 11] + [77] + image + [78] + [12, 13, 14] + [77] + image + [78] + [15, 16, 17, 18],
        # two images back to back (one run of image tokens for transformers)
        [2, 20] + image + image + [21, 22],
        # an image at the very end
        [2, 30, 31, 32, 33, 34, 35, 77] + image,
    ]
    length = max(map(len, rows))  # right padding, as the collator pads
    input_ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    token_type_ids = (input_ids == 79).long()

    captured = {}

    def capture(module, args, kwargs):
        captured.update(kwargs["attention_mask"])

    model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():  # no pixel_values: the masks still come from token_type_ids
        model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
    ours = run_lora_vlm.gemma3_reference_attention_masks(attention_mask, token_type_ids, SLIDING_WINDOW, torch.float32)

    assert set(ours) == set(captured) == {"full_attention", "sliding_attention"}
    for kind in ours:
        assert ours[kind].shape == captured[kind].shape == (3, 1, length, length)
        assert torch.equal(ours[kind], captured[kind]), kind
    # The pattern is not a plain causal one: an image token sees a later token of its own image, on both kinds,
    # and the sliding layer hides a key the full layer shows.
    assert ours["sliding_attention"][0, 0, 4, 7] == 0 and ours["full_attention"][0, 0, 4, 7] == 0
    assert ours["sliding_attention"][0, 0, 20, 0] < 0 and ours["full_attention"][0, 0, 20, 0] == 0


def test_masks_build_without_reading_values_back():
    """On the meta device any host read or data-dependent shape fails: the masks need neither."""
    attention_mask = torch.ones(2, 40, dtype=torch.long, device="meta")
    token_type_ids = torch.zeros(2, 40, dtype=torch.long, device="meta")
    masks = run_lora_vlm.gemma3_reference_attention_masks(attention_mask, token_type_ids, 16, torch.bfloat16)
    assert {kind: (m.shape, m.dtype, m.device.type) for kind, m in masks.items()} == {
        "full_attention": ((2, 1, 40, 40), torch.bfloat16, "meta"),
        "sliding_attention": ((2, 1, 40, 40), torch.bfloat16, "meta"),
    }


def _gaudi_args(**flags):
    defaults = dict(use_habana=True, do_train=True, attn_implementation="gaudi_fused_sdpa",
                    flash_attention_causal_mask=False, flash_attention_fast_softmax=False,
                    flash_attention_recompute=False)
    return SimpleNamespace(**{**defaults, **flags})


def test_flash_attention_causal_mask_is_refused_for_gemma3():
    with pytest.raises(ValueError, match="--flash_attention_causal_mask"):
        run_lora_vlm.check_gemma3_hpu_attention_flags("gemma3", _gaudi_args(flash_attention_causal_mask=True))
    with pytest.raises(ValueError, match="--flash_attention_fast_softmax with --flash_attention_recompute"):
        run_lora_vlm.check_gemma3_hpu_attention_flags(
            "gemma3", _gaudi_args(flash_attention_fast_softmax=True, flash_attention_recompute=True))
    # Each of them alone is fine, and so is fast softmax with recompute when nothing is trained.
    run_lora_vlm.check_gemma3_hpu_attention_flags("gemma3", _gaudi_args(flash_attention_fast_softmax=True))
    run_lora_vlm.check_gemma3_hpu_attention_flags("gemma3", _gaudi_args(flash_attention_recompute=True))
    run_lora_vlm.check_gemma3_hpu_attention_flags(
        "gemma3", _gaudi_args(flash_attention_fast_softmax=True, flash_attention_recompute=True, do_train=False))
    # Other families never receive these options.
    run_lora_vlm.check_gemma3_hpu_attention_flags("llava_next", _gaudi_args(flash_attention_causal_mask=True))


def test_reference_attention_is_not_installed_off_gaudi():
    model = _tiny_upstream_gemma3()
    assert run_lora_vlm.use_gemma3_reference_attention(model, SimpleNamespace(use_habana=False)) is None
    assert not model.model._forward_pre_hooks


def test_hpu_graphs_for_generation_wrap_the_model_generate_runs(monkeypatch):
    """--use_hpu_graphs_for_inference: generate() under PEFT's wrapper runs the base model's forward, so that is the
    module wrapped (once), not the PEFT model the trainer wraps for evaluation. Habana's wrap_in_hpu_graph is replaced
    by a recording pass-through (this machine has no HPU graphs)."""
    import functools
    import sys
    import types

    from peft import LoraConfig, get_peft_model

    wrapped, graph_calls = [], []

    def wrap_in_hpu_graph(module):
        forward = module.forward

        @functools.wraps(forward)
        def graph_forward(*args, **kwargs):
            graph_calls.append(type(module).__name__)
            return forward(*args, **kwargs)

        module.forward = graph_forward
        wrapped.append(module)
        return module

    hpu = types.ModuleType("habana_frameworks.torch.hpu")
    hpu.wrap_in_hpu_graph = wrap_in_hpu_graph
    for name, module in (("habana_frameworks", types.ModuleType("habana_frameworks")),
                         ("habana_frameworks.torch", types.ModuleType("habana_frameworks.torch")),
                         ("habana_frameworks.torch.hpu", hpu)):
        monkeypatch.setitem(sys.modules, name, module)
    model = get_peft_model(_tiny_upstream_gemma3(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert run_lora_vlm.hpu_generation_model(model, {"hpu_graphs": False}) is model and not wrapped
    for _ in range(2):
        generating = run_lora_vlm.hpu_generation_model(model, {"hpu_graphs": True})
        generating.generate(input_ids=torch.tensor([[2, 10, 11, 12]]), max_new_tokens=3, do_sample=False)
    assert generating is model and wrapped == [model.get_base_model()]  # wrapped once
    assert graph_calls == ["Gemma3ForConditionalGeneration"] * 6  # every step of both generations


# --------------------------------------------------------------------------- the Gaudi port, in a subprocess


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Upstream transformers here (optimum.habana is never imported in this process); the port in a subprocess."""
    from test_habana_double import _subprocess_env

    work = tmp_path_factory.mktemp("gemma3_attention")
    torch.save(_reference_case(work), work / "case.pt")
    env = _subprocess_env()  # the double first on PYTHONPATH; then run_lora_vlm.py's folder
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(HERE.parent)])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(work)], cwd=str(HERE.parent),
                          env=env, capture_output=True, text=True, timeout=900)
    out = work / "result.json"
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"subprocess failed (rc={proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


def test_same_weights_are_loaded_into_the_port(compared):
    # The whole port, as on Gaudi: its text model too (only built when the port is in place before the model).
    assert compared["model_cls"] == "GaudiGemma3ForConditionalGeneration"
    assert compared["text_model_cls"] == "GaudiGemma3TextModel"
    assert compared["unexpected_keys"] == [] and compared["missing_parameters"] == []
    assert compared["lora_parameters"] > 0
    # The batch: images, right padding, every row longer than the sliding window.
    assert compared["row_lengths"][0] > compared["row_lengths"][1] > SLIDING_WINDOW
    assert compared["images"] == 3


@pytest.mark.parametrize("variant", ["eager", "fused", "fused_recompute", "fused_fast_softmax"])
def test_port_with_reference_masks_matches_transformers(compared, variant):
    r = compared["variants"][variant]
    assert r["max_logit_diff"] <= ATOL
    assert r["loss_diff"] <= ATOL
    assert r["grads_compared"] == compared["lora_parameters"]
    assert r["max_grad_diff"] <= ATOL
    assert r["reference_max_grad"] > 100 * ATOL  # the gradients compared are not all ~0


def test_fused_variants_really_run_the_fused_kernel_with_the_mask(compared):
    assert compared["variants"]["eager"]["fused_calls"] == []
    length = compared["row_lengths"][0]
    for variant, recompute, softmax in (("fused", False, "none"), ("fused_recompute", True, "none"),
                                        ("fused_fast_softmax", False, "fast")):
        calls = compared["variants"][variant]["fused_calls"]
        assert len(calls) == 2, variant  # one per decoder layer
        for call in calls:
            assert call["mask_shape"] == [2, 1, length, length] and not call["is_causal"]
            assert call["recompute"] == recompute and call["softmax_mode"] == softmax and call["requires_backward"]


def test_grouped_query_heads_reach_the_kernel(compared):
    """4 query heads over 2 key/value heads (as Gemma 3 12B groups 16 over 8): the fused path gets them ungrouped."""
    for call in compared["variants"]["fused"]["fused_calls"]:
        assert call["q_shape"][1] == QUERY_HEADS and call["k_shape"][1] == KV_HEADS


@pytest.mark.parametrize("variant", ["eager", "fused"])
def test_port_matches_transformers_in_bf16_autocast(compared, variant):
    rounding, r = compared["bf16_rounding"], compared["bf16"][variant]
    assert rounding["max_logit_diff"] > 0  # bf16 did round: the yardstick is not zero
    assert r["max_logit_diff"] <= BF16_SLACK * rounding["max_logit_diff"]
    assert r["max_grad_diff"] <= BF16_SLACK * rounding["max_grad_diff"]
    assert r["loss_diff"] <= BF16_SLACK * rounding["loss_diff"]
    # Without the product's masks the same comparison is off by far more than rounding.
    wrong = compared["bf16"]["port_own_masks"]
    assert wrong["max_logit_diff"] > 10 * rounding["max_logit_diff"]


def test_fused_kernel_gets_a_mask_in_the_queries_bf16(compared):
    calls = compared["bf16"]["fused"]["fused_calls"]
    assert len(calls) == 2 and {call["mask_dtype"] for call in calls} == {"torch.bfloat16"}
    # The double refuses what Habana's kernel refuses: a float32 mask with bf16 queries.
    assert "attn_mask is torch.float32 but q is torch.bfloat16" in compared["fused_sdpa_mask_dtype_error"]


def test_image_placeholder_mask_on_gaudi_gives_identical_embeddings_without_a_sync(compared):
    import tiny_assets

    r = compared["placeholder"]
    assert r["identical"]
    # The image features land on the image tokens, and only there (three images in the batch).
    assert r["positions_with_image_features"] == r["image_tokens"] == 3 * tiny_assets.MM_TOKENS_PER_IMAGE
    # Upstream's check indexes with a boolean mask (transformers models/gemma3/modeling_gemma3.py:819): one sync.
    assert r["syncs"] == {"upstream": ["index@modeling_gemma3.py:819:get_placeholder_mask"], "replaced": []}


@pytest.mark.parametrize("attention", ["eager", "fused"])
def test_generation_on_hpu_equals_upstream_greedy_token_for_token(compared, attention):
    """Prompts with images, longer than the sliding window, left-padded; more new tokens than the window."""
    g = compared["generation"]
    assert g["options"] == {"lazy_mode": True, "hpu_graphs": False, "static_shapes": True, "ignore_eos": False}
    r = g[attention]
    assert len(r["expected_tokens"][0]) == NEW_TOKENS  # upstream did not stop early: every step is compared
    assert r["tokens"] == r["expected_tokens"]
    assert r["max_score_diff"] <= ATOL
    if attention == "fused":
        prompt, decode = [c for c in r["fused_calls"] if c["q_shape"][2] > 1], [c for c in r["fused_calls"]
                                                                              if c["q_shape"][2] == 1]
        length = PROMPT_BUCKET + NEW_TOKENS  # static shapes: the prompt padded by max_new_tokens, one cache size
        assert len(prompt) == 2 and all(c["mask_shape"] == [2, 1, length, length] for c in prompt)
        assert len(decode) == 2 * (NEW_TOKENS - 1) and all(c["mask_shape"] == [2, 1, 1, length] for c in decode)


def test_generation_without_the_product_masks_differs(compared):
    r = compared["generation"]["port_own_masks"]
    assert r["tokens"] != r["expected_tokens"]


def test_blank_images_padding_a_batch_on_gaudi_change_nothing(compared):
    """On Gaudi the collator pads a batch's images with blank ones (gaudi_image_rows): appended, no image token
    reads them, with the product's placeholder mask on the port."""
    r = compared["blank_images"]
    assert r["max_logit_diff"] <= ATOL and r["loss_diff"] <= ATOL and r["max_grad_diff"] <= ATOL
    # Put before the real images, the blanks would be what the first image tokens read.
    assert compared["blank_images_first"]["max_logit_diff"] > CLEARLY_DIFFERENT


@pytest.mark.parametrize("variant", ["eager", "fused"])
def test_a_pack_on_the_port_matches_its_rows_unpacked_upstream(compared, variant):
    """--packing on Gaudi: the reference masks keep the pack's rows apart (found from position_ids, as transformers
    finds them); logits row by row, loss and LoRA gradients equal upstream's on the same rows unpacked."""
    r = compared["pack"][variant]
    assert r["max_logit_diff"] <= ATOL and r["loss_diff"] <= ATOL and r["max_grad_diff"] <= ATOL, r
    assert r["grads_compared"] == compared["lora_parameters"]
    # The rows' boundaries are found from position_ids on the device: no host sync in the step.
    assert r["syncs"] == []
    if variant == "fused":  # the kernel got the dense per-pack mask
        length = sum(compared["row_lengths"]) + 3
        assert r["fused_calls"] and all(c["mask_shape"] == [1, 1, length, length] for c in r["fused_calls"])


def test_text_only_rows_match_too(compared):
    """No image: only the sliding window and padding shape the masks."""
    r = compared["text_only"]
    assert r["max_logit_diff"] <= ATOL and r["max_grad_diff"] <= ATOL


def test_port_without_the_product_masks_differs(compared):
    # Its own masks: image tokens attend causally only, and (text-only rows too) its sliding window is one
    # key wider than transformers' (optimum/habana/transformers/modeling_attn_mask_utils.py:60-65).
    assert compared["port_own_masks"]["max_logit_diff"] > CLEARLY_DIFFERENT
    assert compared["port_own_masks"]["max_grad_diff"] > CLEARLY_DIFFERENT
    assert compared["port_own_masks_text_only"]["max_logit_diff"] > CLEARLY_DIFFERENT


def test_flash_attention_causal_mask_changes_the_result(compared):
    r = compared["causal_mask_flag"]
    assert r["max_logit_diff"] > CLEARLY_DIFFERENT
    assert r["fused_causal_calls"] == 2  # is_causal=True, no mask, on both layers


def test_fast_softmax_with_recompute_fails_in_training(compared):
    # What Habana's FusedSDPA wrapper asserts when a masked (non-causal) call trains with both options.
    assert compared["fast_softmax_recompute_error"].startswith("AssertionError: Optimized softmax mode")


def test_double_fused_sdpa_computes_what_torch_sdpa_computes(compared):
    """Mask, scale, causal flag, grouped heads and valid lengths, against torch (tests/habana_double/README.md)."""
    kernel = dict(compared["kernel"])
    assert kernel.pop("unmasked_vs_causal") > CLEARLY_DIFFERENT  # the cases below do tell masks apart
    assert kernel and all(gap <= 1e-6 for gap in kernel.values()), kernel


# --------------------------------------------------------------------------- shared: the reference case here, the port in the subprocess


def _batch(tokenizer, config, with_images=True):
    """Two rows, the second right-padded; labels on each row's last tokens, as the collator marks answers."""
    gen = torch.Generator().manual_seed(1)
    boi, eoi, image = config.boi_token_index, config.eoi_token_index, config.image_token_id
    first_text = 9 + 256  # past the special and byte-fallback tokens

    def text(n):
        return torch.randint(first_text, image, (n,), generator=gen).tolist()

    picture = [boi] + [image] * config.mm_tokens_per_image + [eoi] if with_images else text(6)
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    rows = [[bos] + text(3) + picture + text(4) + picture + text(5), [bos] + text(2) + picture + text(4)]
    length = max(map(len, rows))
    input_ids = torch.tensor([row + [pad] * (length - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    labels = input_ids.clone()
    for i, row in enumerate(rows):
        labels[i, : len(row) - 4] = run_lora_vlm.IGNORE_INDEX
        labels[i, len(row):] = run_lora_vlm.IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": (input_ids == image).long()}
    if with_images:
        size = config.vision_config.image_size
        batch["pixel_values"] = torch.randn(int((input_ids == boi).sum()), 3, size, size, generator=gen)
    return batch, labels, [len(row) for row in rows]


def _forward_backward(model, batch, labels, **model_inputs):
    model.zero_grad(set_to_none=True)
    outputs = model(**batch, **model_inputs)
    loss = run_lora_vlm.causal_lm_loss(outputs, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"logits": outputs.logits.detach().float(), "loss": loss.item(), "grads": grads}


def _compare(result, reference):
    assert result["grads"].keys() == reference["grads"].keys()
    return {
        "max_logit_diff": (result["logits"] - reference["logits"]).abs().max().item(),
        "loss_diff": abs(result["loss"] - reference["loss"]),
        "grads_compared": len(reference["grads"]),
        "max_grad_diff": max((result["grads"][n] - g).abs().max().item() for n, g in reference["grads"].items()),
        "reference_max_grad": max(g.abs().max().item() for g in reference["grads"].values()),
    }


def _port_inputs(**flags):
    """The port's forward options (models/gemma3/modeling_gemma3.py:945-950), as the collator sends them on Gaudi."""
    return {"use_flash_attention": False, "flash_attention_recompute": False, "flash_attention_causal_mask": False,
            "flash_attention_fast_softmax": False, "lazy_mode": True, **flags}


LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # random B too: every LoRA weight gets a gradient
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")


def _reference_case(config_dir):
    """Weights, batches and upstream transformers' logits, loss and LoRA gradients for them."""
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForConditionalGeneration

    import tiny_assets

    tokenizer = tiny_assets.build_tokenizer()
    config = tiny_assets.build_config(tokenizer)
    config.text_config.sliding_window = SLIDING_WINDOW
    # Grouped-query attention, as Gemma 3 has it (12B: 16 query heads over 8 key/value heads).
    config.text_config.num_attention_heads, config.text_config.num_key_value_heads = QUERY_HEADS, KV_HEADS
    config.save_pretrained(config_dir)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # a fresh projector is all zeros, which would cut the images off
        reference.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    reference = get_peft_model(reference, LoraConfig(**LORA)).train()
    case = {"weights": {k: v.clone() for k, v in reference.state_dict().items()}}
    for name, with_images in (("images", True), ("text_only", False)):
        batch, labels, row_lengths = _batch(tokenizer, config, with_images)
        case[name] = {"batch": batch, "labels": labels, "row_lengths": row_lengths,
                      "expected": _forward_backward(reference, batch, labels)}
    images = case["images"]
    case["pack"] = _pack(images, tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        case["images_bf16"] = {**images, "expected": _forward_backward(reference, images["batch"], images["labels"])}
    # How far bf16 rounding alone moves upstream's own results (bf16 autocast against float32): the yardstick of the
    # bf16 comparisons.
    case["bf16_rounding"] = _compare(case["images_bf16"]["expected"], images["expected"])
    reference.eval()
    prompts = _prompts(tokenizer, config)
    with torch.no_grad():
        generated = reference.generate(**prompts, **_greedy(config))
    case["generation"] = {"prompts": prompts, "expected": _generated(generated, prompts)}
    return case


def _pack(images, tokenizer, padding=3):
    """The two rows of the `images` batch as one pack (--packing's layout: end to end, position_ids restarting at each
    row and at the padding, no attention_mask, no cache), with the unpacked batch's upstream results to match."""
    batch, labels, lengths = images["batch"], images["labels"], images["row_lengths"]
    pad = tokenizer.pad_token_id
    pieces = [(batch["input_ids"][i, :n], labels[i, :n], batch["token_type_ids"][i, :n])
              for i, n in enumerate(lengths)]
    input_ids = torch.cat([p[0] for p in pieces] + [torch.full((padding,), pad)]).view(1, -1)
    packed_labels = torch.cat([p[1] for p in pieces] + [torch.full((padding,), run_lora_vlm.IGNORE_INDEX)]).view(1, -1)
    token_type_ids = torch.cat([p[2] for p in pieces] + [torch.zeros(padding, dtype=torch.long)]).view(1, -1)
    position_ids = torch.cat([torch.arange(n) for n in [*lengths, padding]]).view(1, -1)
    packed = {"input_ids": input_ids, "token_type_ids": token_type_ids, "position_ids": position_ids,
              "pixel_values": batch["pixel_values"], "use_cache": False}
    return {"batch": packed, "labels": packed_labels, "row_lengths": lengths, "expected": images["expected"]}


def _pack_compared(result, pack):
    """_compare for a pack: its logits row by row against the unpacked batch's, loss and LoRA gradients as they are."""
    expected, start, logit_diff = pack["expected"], 0, 0.0
    for i, n in enumerate(pack["row_lengths"]):
        row_diff = (result["logits"][0, start:start + n] - expected["logits"][i, :n]).abs().max().item()
        logit_diff = max(logit_diff, row_diff)
        start += n
    return {"max_logit_diff": logit_diff, "loss_diff": abs(result["loss"] - expected["loss"]),
            "grads_compared": len(expected["grads"]),
            "max_grad_diff": max((result["grads"][n] - g).abs().max().item() for n, g in expected["grads"].items())}


def _step_syncs(model, case, **model_inputs):
    """The host syncs (tests/aten_cost.py) of one forward and backward of `case`, the loss read back left out."""
    import aten_cost

    model.zero_grad(set_to_none=True)
    with aten_cost.AtenCost() as cost:
        run_lora_vlm.causal_lm_loss(model(**case["batch"], **model_inputs), case["labels"]).backward()
    return [f"{op}@{site}" for _, op, site in cost.events]


def _prompts(tokenizer, config):
    """Two generation prompts with images, left-padded to one length (as GenerationEvaluator pads them to a bucket),
    both longer than the sliding window."""
    gen = torch.Generator().manual_seed(3)
    boi, eoi, image = config.boi_token_index, config.eoi_token_index, config.image_token_id
    picture = [boi] + [image] * config.mm_tokens_per_image + [eoi]

    def text(n):
        return torch.randint(9 + 256, image, (n,), generator=gen).tolist()

    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    rows = [[bos] + text(3) + picture + text(2) + picture + text(3), [bos] + text(2) + picture + text(4)]
    length = PROMPT_BUCKET
    input_ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    size = config.vision_config.image_size
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": (input_ids == image).long(),
            "pixel_values": torch.randn(int((input_ids == boi).sum()), 3, size, size, generator=gen)}


def _greedy(config):
    """Greedy decoding as GenerationEvaluator asks for it, with the scores of every step."""
    return {"max_new_tokens": NEW_TOKENS, "do_sample": False, "use_cache": True,
            "eos_token_id": config.text_config.eos_token_id, "pad_token_id": config.text_config.pad_token_id,
            "output_scores": True, "return_dict_in_generate": True}


def _generated(output, prompts):
    """(new tokens per row, scores per step) of a generate() output; optimum-habana's static shapes return the
    sequences padded to prompt + max_new_tokens, so only the steps taken are kept."""
    steps = len(output.scores)
    tokens = output.sequences[:, prompts["input_ids"].shape[1]:][:, :steps]
    return {"tokens": tokens.tolist(), "scores": torch.stack([score.float() for score in output.scores]),
            "tail": output.sequences[:, prompts["input_ids"].shape[1] + steps:].tolist()}


def _fused_sdpa_against_torch():
    """The double's FusedSDPA against torch's own scaled_dot_product_attention, case by case (max abs diff)."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from habana_frameworks.torch.hpex.kernels import FusedSDPA

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, heads, 6, 8, generator=gen) for heads in (4, 2, 2))  # grouped: 2 query heads per k/v head
    additive = torch.randn(2, 1, 6, 6, generator=gen)
    allowed = torch.rand(2, 1, 6, 6, generator=gen) > 0.3
    allowed[..., 0] = True  # no row without a visible key
    valid = torch.tensor([4, 6])
    key = torch.arange(6)
    causal = key[None, :] <= key[:, None]
    right = (key[None, :] < valid[:, None]).view(2, 1, 1, 6) & causal
    left = (key[None, :] >= 6 - valid[:, None]).view(2, 1, 1, 6) & causal
    real_query = (key[None, :] >= 6 - valid[:, None]).view(2, 1, 6, 1)  # left padding: rows of real tokens

    def diff(ours, theirs, rows=None):
        gap = (ours - theirs).abs()
        return (gap if rows is None else gap * rows).max().item()

    return {
        "additive_mask_scale": diff(FusedSDPA.apply(q, k, v, additive, 0.0, False, 0.3, "None"),
                                    sdpa(q, k, v, additive, scale=0.3, enable_gqa=True)),
        "bool_mask": diff(FusedSDPA.apply(q, k, v, allowed, 0.0, False, None), sdpa(q, k, v, allowed, enable_gqa=True)),
        "causal": diff(FusedSDPA.apply(q, k, v, None, 0.0, True, None, "fast", True),
                       sdpa(q, k, v, is_causal=True, enable_gqa=True)),
        "valid_lengths_right": diff(FusedSDPA.apply(q, k, v, None, 0.0, True, None, "None", False, valid, "right"),
                                    sdpa(q, k, v, right, enable_gqa=True)),
        "valid_lengths_left": diff(FusedSDPA.apply(q, k, v, None, 0.0, True, None, "None", False, valid, "left"),
                                   sdpa(q, k, v, left, enable_gqa=True), rows=real_query),
        "unmasked_vs_causal": diff(FusedSDPA.apply(q, k, v, None, 0.0, False, None),
                                   sdpa(q, k, v, is_causal=True, enable_gqa=True)),
    }


def _placeholder_replacement(port, images):
    """The embeddings the language model gets, and the host syncs of a forward, with the product's image placeholder
    mask on Gaudi and with upstream's (which counts the image tokens through a boolean index)."""
    import aten_cost

    gemma3_model = port.get_base_model().model
    batch = images["batch"]
    captured = []
    grab = gemma3_model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    syncs = {}
    replacement = gemma3_model.__dict__.pop("get_placeholder_mask")
    for name in ("upstream", "replaced"):
        if name == "replaced":
            gemma3_model.get_placeholder_mask = replacement
        with torch.no_grad(), aten_cost.AtenCost() as cost:
            port(**batch, **_port_inputs())
        syncs[name] = [f"{op}@{site}" for _, op, site in cost.events]
    grab.remove()
    with torch.no_grad():
        text_embeddings = gemma3_model.get_input_embeddings()(batch["input_ids"])
    return {"identical": torch.equal(captured[0], captured[1]), "syncs": syncs,
            "positions_with_image_features": int((captured[1] != text_embeddings).any(-1).sum()),
            "image_tokens": int((batch["input_ids"] == gemma3_model.config.image_token_id).sum())}


BLANK_IMAGES = 3


def _with_blank_images(inputs, first=False):
    """The batch with BLANK_IMAGES blank images added by the encoder's own pad_images (appended), or put first."""
    batch = dict(inputs["batch"])
    pixels = batch["pixel_values"]
    encoder = SimpleNamespace(blank_pixel_rows=lambda count: torch.zeros(count, *pixels.shape[1:]))
    run_lora_vlm.ChatEncoder.pad_images(encoder, batch, len(pixels) + BLANK_IMAGES)
    assert batch["pixel_values"].shape[0] == len(pixels) + BLANK_IMAGES
    if first:
        batch["pixel_values"] = batch["pixel_values"].roll(BLANK_IMAGES, dims=0)
    return {**inputs, "batch": batch}


def _fused_sdpa_mask_dtype_error():
    from habana_frameworks.torch.hpex.kernels import FusedSDPA

    q = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    try:
        FusedSDPA.apply(q, q, q, torch.zeros(1, 1, 3, 3), 0.0, False, None)
    except RuntimeError as e:
        return str(e)
    return None


def scenario(work):
    """The port: adapt_transformers_to_gaudi() first, as GaudiTrainingArguments does before the model is loaded."""
    from test_habana_double import _ensure_torchvision

    _ensure_torchvision()
    import habana_frameworks
    from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi

    adapt_transformers_to_gaudi()
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3Config
    from transformers.models.gemma3 import modeling_gemma3

    case = torch.load(Path(work) / "case.pt", weights_only=True)
    config = Gemma3Config.from_pretrained(work)
    config._attn_implementation = "eager"
    port = modeling_gemma3.Gemma3ForConditionalGeneration(config)
    res = {"model_cls": type(port).__name__, "text_model_cls": type(port.model.language_model).__name__}
    port = get_peft_model(port, LoraConfig(**LORA)).train()
    missing, unexpected = port.load_state_dict(case["weights"], strict=False)
    parameters = dict(port.named_parameters())
    images, text_only = case["images"], case["text_only"]
    res.update(
        missing_parameters=sorted(k for k in missing if k in parameters),
        unexpected_keys=sorted(unexpected),
        lora_parameters=sum("lora_" in n for n, p in parameters.items() if p.requires_grad),
        row_lengths=images["row_lengths"],
        images=len(images["batch"]["pixel_values"]),
        variants={},
    )

    def run(inputs, **flags):
        habana_frameworks.reset()
        result = _forward_backward(port, inputs["batch"], inputs["labels"], **_port_inputs(**flags))
        return {**_compare(result, inputs["expected"]),
                "fused_calls": [c[2] for c in habana_frameworks.calls("hpex.kernels.FusedSDPA.apply")]}

    hook = run_lora_vlm.use_gemma3_reference_attention(port, SimpleNamespace(use_habana=True))
    for variant, flags in {
        "eager": {},
        "fused": {"use_flash_attention": True},
        "fused_recompute": {"use_flash_attention": True, "flash_attention_recompute": True},
        "fused_fast_softmax": {"use_flash_attention": True, "flash_attention_fast_softmax": True},
    }.items():
        res["variants"][variant] = run(images, **flags)
    res["text_only"] = run(text_only, use_flash_attention=True)
    res["blank_images"] = run(_with_blank_images(images), use_flash_attention=True)
    res["blank_images_first"] = run(_with_blank_images(images, first=True), use_flash_attention=True)
    for variant, flags in {"eager": {}, "fused": {"use_flash_attention": True}}.items():
        habana_frameworks.reset()
        pack = case["pack"]
        result = _forward_backward(port, pack["batch"], pack["labels"], **_port_inputs(**flags))
        res.setdefault("pack", {})[variant] = {
            **_pack_compared(result, pack),
            "fused_calls": [c[2] for c in habana_frameworks.calls("hpex.kernels.FusedSDPA.apply")],
            "syncs": _step_syncs(port, pack, **_port_inputs(**flags))}
    causal = run(images, use_flash_attention=True, flash_attention_causal_mask=True)
    res["causal_mask_flag"] = {
        **causal, "fused_causal_calls": sum(c["is_causal"] and c["mask_shape"] is None for c in causal["fused_calls"])
    }
    try:
        run(images, use_flash_attention=True, flash_attention_fast_softmax=True, flash_attention_recompute=True)
        res["fast_softmax_recompute_error"] = None
    except Exception as e:  # noqa: BLE001 - the type is the result
        res["fast_softmax_recompute_error"] = f"{type(e).__name__}: {e}"

    with torch.autocast("cpu", dtype=torch.bfloat16):
        res["bf16"] = {"eager": run(case["images_bf16"]), "fused": run(case["images_bf16"], use_flash_attention=True)}
    res["bf16_rounding"] = case["bf16_rounding"]
    res["placeholder"] = _placeholder_replacement(port, images)
    res["fused_sdpa_mask_dtype_error"] = _fused_sdpa_mask_dtype_error()

    port.eval()
    generation = case["generation"]
    options = run_lora_vlm.hpu_generation_options(
        SimpleNamespace(use_habana=True, use_lazy_mode=True, use_hpu_graphs_for_inference=False, use_cpu=False))

    def generate(model=port, **flags):
        habana_frameworks.reset()
        with torch.no_grad():
            output = model.generate(**generation["prompts"], **_greedy(config), **options, **flags)
        got, expected = _generated(output, generation["prompts"]), generation["expected"]
        same_steps = got["scores"].shape == expected["scores"].shape
        return {"tokens": got["tokens"], "expected_tokens": expected["tokens"], "tail": got["tail"],
                "max_score_diff": (got["scores"] - expected["scores"]).abs().max().item() if same_steps else None,
                "fused_calls": [c[2] for c in habana_frameworks.calls("hpex.kernels.FusedSDPA.apply")]}

    res["generation"] = {"options": options, "eager": generate(), "fused": generate(use_flash_attention=True)}

    hook.remove()
    port.train()
    res["port_own_masks"] = run(images)
    res["port_own_masks_text_only"] = run(text_only)
    port.eval()
    res["generation"]["port_own_masks"] = generate()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        port.train()
        res["bf16"]["port_own_masks"] = run(case["images_bf16"])
    with torch.no_grad():
        res["kernel"] = _fused_sdpa_against_torch()
    return res


if __name__ == "__main__":
    Path(sys.argv[1], "result.json").write_text(json.dumps(scenario(sys.argv[1]), indent=1))
