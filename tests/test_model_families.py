# Licensed under the Apache License, Version 2.0 (the "License").
"""Every supported family (picked from config.model_type) through the same CLI, with the same checks."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from peft import PeftModel
from transformers import AutoModelForImageTextToText

import run_lora_vlm as rlv
import tiny_assets
from conftest import IGNORE_INDEX, make_collator, run_training, script_args, train_argv

END_OF_TURN = {"gemma3": "<end_of_turn>", "qwen2_5_vl": "<|im_end|>", "llava_next": "</s>"}


@pytest.fixture(scope="module", params=["gemma3", "qwen2_5_vl", "llava_next"])
def family_run(request, assets, family_models, tmp_path_factory):
    """(family name, model folder, trainer, output folder) after a short training run."""
    name = request.param
    model_dir = family_models[name]
    output_dir = tmp_path_factory.mktemp(f"{name}_run")
    trainer = run_training(train_argv(
        {**assets, "model": model_dir}, output_dir, "--do_train", "--do_eval", "--max_steps", "6",
        "--per_device_train_batch_size", "4", "--max_eval_samples", "4",
    ))
    return name, model_dir, trainer, output_dir


def processor_for(model_dir):
    return rlv.load_processor(rlv.ModelArguments(model_name_or_path=model_dir))[2]


def test_family_comes_from_the_config_and_trains(family_run):
    name, model_dir, trainer, output_dir = family_run
    config, family, _ = rlv.load_processor(rlv.ModelArguments(model_name_or_path=model_dir))
    assert config.model_type == name and family is rlv.MODEL_FAMILIES[name]
    results = json.loads((output_dir / "all_results.json").read_text())
    assert math.isfinite(results["eval_loss"]) and math.isfinite(results["train_loss"])


def test_lora_adapts_only_the_language_model_by_default(family_run):
    _, _, trainer, _ = family_run
    adapted = {n for n, _ in trainer.model.named_parameters() if "lora_" in n}
    assert adapted and all(".language_model." in n for n in adapted)
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == adapted


def test_trained_tokens_are_exactly_the_answers(family_run):
    name, model_dir, trainer, _ = family_run
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    tokenizer = processor_for(model_dir).tokenizer
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"]):
        positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert positions == list(range(positions[0], positions[-1] + 1))  # one run
        # The answer's tokens, the end-of-turn token, nothing after it. LLaVA-NeXT's tokenizer puts a "▁" in front
        # of text, which stands for the space its template writes before the answer (" [/INST] 3</s> ").
        answer = row["row"]["label"][0]
        assert tokenizer.convert_ids_to_tokens(ids[positions]) == tokenizer.tokenize(answer) + [END_OF_TURN[name]]


def test_adapter_reload_gives_identical_logits_and_the_vision_tower_is_untouched(family_run):
    _, model_dir, trainer, output_dir = family_run
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(2)])
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "row_ids")}
    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        actual = PeftModel.from_pretrained(base, str(output_dir)).eval()(**inputs).logits
    assert torch.allclose(actual, expected, atol=1e-5)
    adapted = {k: v for k, v in trained.state_dict().items() if "lora_" not in k}
    for name, value in reference.items():
        matches = [v for k, v in adapted.items() if k.replace(".base_layer", "").endswith(name.split(".", 1)[-1])]
        assert matches and any(torch.equal(v, value) for v in matches), name
    assert [k for k in reference if "vision" in k or "visual" in k]  # the vision tower is among the weights compared


def test_merged_export_loads_and_answers_like_base_plus_adapter(family_run, tmp_path, capsys):
    name, model_dir, _, output_dir = family_run
    assert rlv.cli(["--model_name_or_path", model_dir, "--adapter_path", str(output_dir), "--merge_adapter",
                    "--output_dir", str(tmp_path)]) == 0
    merged = tmp_path / "merged"
    model = AutoModelForImageTextToText.from_pretrained(str(merged))
    end_of_turn = processor_for(model_dir).tokenizer.convert_tokens_to_ids(END_OF_TURN[name])
    assert end_of_turn in model.generation_config.eos_token_id
    image = tmp_path / "chart.png"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(image)
    ask = ["--predict_image", str(image), "--predict_question", "Which bar is the tallest?", "--output_dir", str(tmp_path)]

    def answer(*model_flags):
        capsys.readouterr()
        assert rlv.cli([*model_flags, *ask]) == 0
        return capsys.readouterr().out

    with_adapter = answer("--model_name_or_path", model_dir, "--adapter_path", str(output_dir))
    from_merged = answer("--model_name_or_path", str(merged))
    assert with_adapter.endswith("\n") and with_adapter == from_merged  # the answer, printed (may be empty)


@pytest.mark.parametrize("name", ["gemma3", "qwen2_5_vl", "llava_next"])
def test_the_pixels_reach_the_logits_at_the_answer_position(name, family_models, chart_rows):
    model_dir = family_models[name]
    collator = make_collator(processor_for(model_dir), script_args().data, ["image", "query", "label"], family=name)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()

    def answer_logits(image):
        """(the logits that predict the answer's first token, the batch's token ids) for the first chart's question
        about `image`."""
        batch = collator([{"row": {**chart_rows[0], "image": image}, "split": "train", "row_index": 0}])
        answer_position = int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0]) - 1
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "row_ids", "logits_to_keep")}
        with torch.no_grad():
            return model(**inputs).logits[0, answer_position], batch["input_ids"]

    width, height = tiny_assets.CHART_SIZE
    white = Image.new("RGB", (width, height), (255, 255, 255))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    charts = [row["image"] for row in chart_rows[:2]]
    logits, ids = zip(*[answer_logits(image) for image in [white, white, noise, *charts]])
    # Images of one size: the same tokens every time, so only the pixels differ.
    assert all(torch.equal(other, ids[0]) for other in ids[1:])
    assert torch.equal(logits[0], logits[1])
    differences = [(logits[0] - logits[2]).abs().max().item(), (logits[3] - logits[4]).abs().max().item()]
    # The logits' spread here is 0.15 to 0.3 (random weights); a model that ignores the pixels differs by 0.0.
    assert min(differences) > 0.02, differences


def test_an_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ValueError, match="Model type 'bert' is not supported; supported model types: gemma3, llava_next, qwen2_5_vl"):
        rlv.model_family("bert")


@pytest.mark.parametrize("name, tower, projector", [
    ("gemma3", ".vision_tower.", ".multi_modal_projector."),
    ("qwen2_5_vl", ".visual.", ".visual.merger."),
    ("llava_next", ".vision_tower.", ".multi_modal_projector."),
])
def test_vision_tower_and_projector_train_only_when_asked(name, tower, projector, family_models, assets, tmp_path):
    trainer = run_training(train_argv(
        {**assets, "model": family_models[name]}, tmp_path, "--do_train", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--train_vision_tower", "--train_projector",
    ))
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    vision_lora = [n for n in trainable if tower in n and "lora_" in n and projector not in n]
    projector_copies = [n for n in trainable if projector in n and "modules_to_save" in n]
    assert vision_lora and projector_copies
    assert not [n for n in trainable if projector in n and "lora_" in n]  # trained in full, not through LoRA
    # It did learn (LLaVA-NeXT reads the second-to-last vision layer, so the last one's LoRA stays put).
    assert any(trainable[n].abs().sum() > 0 for n in vision_lora if "lora_B" in n)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["modules_to_save"] and tower.strip(".") in saved["target_modules"]


def test_fixed_image_size_gives_every_qwen_image_the_same_token_count(family_models, assets):
    processor = processor_for(family_models["qwen2_5_vl"])
    rows = [{"image": Image.new("RGB", size, (0, 0, 255)), "question": "Q?", "answer": "A"}
            for size in ((96, 64), (40, 200), (300, 120))]
    features = [{"row": row, "split": "train", "row_index": i} for i, row in enumerate(rows)]

    def image_tokens(*flags):
        collator = make_collator(processor, script_args(*flags).data, ["image", "question", "answer"], family="qwen2_5_vl")
        batch = collator(features)
        return (batch["input_ids"] == collator.encoder.image_token_id).sum(dim=1).tolist(), batch["image_grid_thw"].tolist()

    dynamic, _ = image_tokens()
    fixed, grids = image_tokens("--fixed_image_size", "56", "84")
    assert len(set(dynamic)) > 1 and len(set(fixed)) == 1
    assert grids == [[1, 4, 6]] * 3
    smaller, _ = image_tokens("--image_max_pixels", str(28 * 28 * 4))
    assert max(smaller) < max(dynamic)


def test_pixel_budget_flags_are_refused_for_fixed_resolution_families(processor):
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        make_collator(processor, script_args("--image_max_pixels", "1000").data, ["image", "question", "answer"])


@pytest.mark.parametrize("name", ["gemma3", "qwen2_5_vl", "llava_next"])
def test_a_batch_mixing_rows_with_and_without_images_holds_each_row_as_alone(name, family_models):
    """Processors refuse a batch where some rows have no image; the encoder processes the two kinds apart."""
    def row(image, question, answer):
        user = [{"type": "image"}] * (image is not None) + [{"type": "text", "text": question}]
        return {"images": [image] if image is not None else [],
                "messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}

    processor = processor_for(family_models[name])
    collator = make_collator(processor, script_args().data, ("images", "messages"), family=name)
    rows = [row(Image.new("RGB", (64, 48), "red"), "What is it?", "A red square"),
            row(None, "Say hi, please, at some length?", "hi"), row(Image.new("RGB", (40, 40), "blue"), "Q?", "blue")]
    features = [{"row": r, "split": "train", "row_index": i} for i, r in enumerate(rows)]
    batch, alone = collator(features), [collator([feature]) for feature in features]
    for i, single in enumerate(alone):
        length = single["input_ids"].shape[1]
        assert batch["input_ids"][i, :length].tolist() == single["input_ids"][0].tolist()
        assert batch["labels"][i, :length].tolist() == single["labels"][0].tolist()
        assert not batch["attention_mask"][i, length:].any()
    assert torch.equal(batch["pixel_values"], torch.cat([alone[0]["pixel_values"], alone[2]["pixel_values"]]))
    # Generation's prompts: left-padded tensors, each row's tokens as alone.
    encoder = collator.encoder
    prompts = [encoder.generation_prompt(r) for r in rows]
    mixed = encoder.process([p[0] for p in prompts], [p[1] for p in prompts], padding_side="left", return_tensors="pt")
    for i, (text, images, *_) in enumerate(prompts):
        single = encoder.process([text], [images], padding_side="left", return_tensors="pt")
        length = single["input_ids"].shape[1]
        assert mixed["input_ids"][i, -length:].tolist() == single["input_ids"][0].tolist()
        assert mixed["attention_mask"][i].sum() == length
