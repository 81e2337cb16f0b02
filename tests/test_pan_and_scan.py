# Licensed under the Apache License, Version 2.0 (the "License").
"""--pan_and_scan (Gemma 3 crops): the crop count from the image size alone, the collated row against the processor
run directly, labels on the assistant's tokens only, the validation pass's length, the settings saved with the
processor, and the refusals."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import run_lora_vlm as rlv
from conftest import make_collator, script_args, train_argv, trained_runs

# The tiny Gemma 3 (tests/tiny_assets.py) resizes every image and crop to 32x32 and gives each 4 image tokens.
CROP_FLAGS = ("--pan_and_scan", "--pan_and_scan_max_crops", "4", "--pan_and_scan_min_crop_size", "16",
              "--pan_and_scan_min_ratio", "1.2")
PROCESSOR_CROP_KWARGS = {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_crop_size": 16,
                         "pan_and_scan_min_ratio_to_activate": 1.2}


@pytest.fixture
def fresh_processor(assets):
    """The tiny Gemma 3's processor, loaded for this test alone: --pan_and_scan writes its settings into it."""
    return rlv.load_processor(rlv.ModelArguments(model_name_or_path=assets["model"]))[2]


def noise_image(width, height, seed=0) -> Image.Image:
    """A chart stand-in whose every crop differs, so that pixel rows cannot match by accident."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def feature(row, index=0):
    return {"row": row, "split": "train", "row_index": index}


def collator_for(processor, *flags):
    return make_collator(processor, script_args(*CROP_FLAGS, *flags).data, ("image", "question", "answer"))


@pytest.mark.parametrize("height, width", [(64, 256), (256, 64), (64, 64), (64, 76), (64, 77), (40, 200), (20, 100),
                                           (17, 300), (64, 1000), (1000, 70), (31, 33), (100, 150)])
@pytest.mark.parametrize("max_crops, min_crop, min_ratio", [(4, 16, 1.2), (2, 32, 2.0), (8, 8, 1.0)])
def test_crop_count_from_the_size_matches_the_image_processor(fresh_processor, height, width, max_crops, min_crop,
                                                              min_ratio):
    settings = {"pan_and_scan_max_num_crops": max_crops, "pan_and_scan_min_crop_size": min_crop,
                "pan_and_scan_min_ratio_to_activate": min_ratio}
    crops = fresh_processor.image_processor.pan_and_scan(np.zeros((height, width, 3), dtype=np.uint8), **settings)
    assert rlv.gemma3_pan_and_scan_crops(settings, (height, width)) == len(crops)


def test_wide_chart_row_matches_the_processor_and_trains_only_the_answer(fresh_processor):
    processor, chart = fresh_processor, noise_image(256, 64)
    row = {"image": chart, "question": "Which bar is the tallest?", "answer": "The blue one"}
    batch = collator_for(processor)([feature(row)])
    # A 4:1 chart: round(4) = 4 crops of 64x64 (at least 16 pixels a side), each a 4-token image like the chart.
    assert int((batch["input_ids"][0] == processor.image_token_id).sum()) == (1 + 4) * 4
    assert batch["pixel_values"].shape == (1 + 4, 3, 32, 32)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    bare = processor(text=text, images=[[chart]], add_special_tokens=False, return_tensors="pt",
                     **PROCESSOR_CROP_KWARGS)
    n = bare["input_ids"].shape[1]
    assert batch["input_ids"].shape[1] == n
    assert batch["input_ids"][0].tolist() == bare["input_ids"][0].tolist()
    assert batch["token_type_ids"][0].tolist() == bare["token_type_ids"][0].tolist()
    assert torch.equal(batch["pixel_values"], bare["pixel_values"])
    # Trained: exactly the answer and the end of the turn, the tokens right after "<start_of_turn>model\n".
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    answer_ids = processor.tokenizer("The blue one<end_of_turn>", add_special_tokens=False)["input_ids"]
    trained = (labels != -100).nonzero().flatten().tolist()
    assert trained == list(range(n - 1 - len(answer_ids), n - 1))
    assert labels[trained].tolist() == answer_ids == ids[trained].tolist()
    assert processor.tokenizer.convert_ids_to_tokens(ids[trained[0] - 3: trained[0]].tolist()) == [
        "<start_of_turn>", "model", "\n"]
    assert trained_runs(processor.tokenizer, ids, labels) == ["The blue one<end_of_turn>"]


def test_images_with_and_without_crops_in_one_batch_keep_their_own_pixel_rows(fresh_processor):
    processor = fresh_processor
    images = [noise_image(256, 64, 1), noise_image(64, 64, 2), noise_image(48, 150, 3)]  # 4, 0 and 3 crops
    rows = [{"image": image, "question": f"Question {i}?", "answer": f"answer {i}"} for i, image in enumerate(images)]
    batch = collator_for(processor)([feature(row, i) for i, row in enumerate(rows)])
    expected = torch.cat([processor.image_processor(image, return_tensors="pt", **PROCESSOR_CROP_KWARGS)["pixel_values"]
                          for image in images])
    assert expected.shape[0] == 5 + 1 + 4
    assert torch.equal(batch["pixel_values"], expected)
    image_tokens = (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert image_tokens == [5 * 4, 1 * 4, 4 * 4]
    assert trained_runs(processor.tokenizer, batch["input_ids"][2], batch["labels"][2]) == ["answer 2<end_of_turn>"]
    # Dropping a row keeps the others' pixel rows: the middle image's one row is the 6th of the processor's.
    kept = collator_for(processor).encoder
    chats = [kept.training_chat(row) for row in rows]
    _, processed = kept.encode(chats)
    assert torch.equal(kept.image_inputs(processed, [1])["pixel_values"], expected[5:6])


def test_validation_pass_length_equals_the_collated_length(fresh_processor):
    processor = fresh_processor
    rows = [{"image": png(noise_image(256, 64, 1)), "question": "Which bar is the tallest?", "answer": "The blue one"},
            {"image": png(noise_image(64, 64, 2)), "question": "Value?", "answer": "7"},
            {"image": png(noise_image(48, 150, 3)), "question": "Is A taller than B?", "answer": "Yes, by 2"}]
    collator = collator_for(processor)
    checked = rlv.RowChecker(collator.encoder)({column: [row[column] for row in rows] for column in rows[0]})
    batches = [collator([feature(row, i)]) for i, row in enumerate(rows)]
    collated = [int(batch["attention_mask"].sum()) for batch in batches]
    assert checked["reason"] == ["", "", ""]
    assert checked["length"] == collated
    # Its image sequences are the pixel_values rows each row brings: 4, 0 and 3 crops besides each image.
    assert checked["image_sequences"] == [len(batch["pixel_values"]) for batch in batches] == [5, 1, 4]
    # Without crops the same rows are shorter by the crops' image sequences and the processor's crop wording.
    plain = make_collator(processor, script_args().data, ("image", "question", "answer"))
    plain_lengths = [int(plain([feature(row, i)])["attention_mask"].sum()) for i, row in enumerate(rows)]
    assert plain_lengths[1] == collated[1]
    assert collated[0] - plain_lengths[0] > 4 * 4 and collated[2] - plain_lengths[2] > 3 * 4


def test_a_row_too_long_only_with_its_crops_is_found_by_the_validation_pass(fresh_processor):
    row = {"image": png(noise_image(256, 64)), "question": "Which bar?", "answer": "B"}
    collator = collator_for(fresh_processor, "--max_seq_length", "40")
    checked = rlv.RowChecker(collator.encoder)({column: [row[column]] for column in row})
    assert checked["reason"] == ["too_long"]
    plain = make_collator(fresh_processor, script_args("--max_seq_length", "40").data, ("image", "question", "answer"))
    assert rlv.RowChecker(plain.encoder)({column: [row[column]] for column in row})["reason"] == [""]


def test_settings_default_to_the_processor_and_are_saved_with_it(fresh_processor, tmp_path):
    processor = fresh_processor
    encoder = make_collator(processor, script_args("--pan_and_scan").data, ("image", "question", "answer")).encoder
    # Gemma3Processor's call defaults (processing_gemma3.py:43-49) win over its image processor's settings.
    assert encoder.crop_settings == {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 4,
                                     "pan_and_scan_min_crop_size": 256, "pan_and_scan_min_ratio_to_activate": 1.2}
    encoder = collator_for(processor).encoder  # the flags win over the processor's own
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert {name: saved[name] for name in PROCESSOR_CROP_KWARGS} == PROCESSOR_CROP_KWARGS
    # A server loading the saved processor crops as training did, with no argument: through the processor (whose
    # own defaults are no crops) and through its image processor alone.
    served = rlv.load_processor(rlv.ModelArguments(model_name_or_path=str(_model_folder_with(processor, tmp_path))))[2]
    chart = noise_image(256, 64)
    trained = collator_for(processor)([feature({"image": chart, "question": "Which bar?", "answer": "B"})])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which bar?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "B"}]}]
    text = served.apply_chat_template(messages, tokenize=False)
    bare = served(text=text, images=[[chart]], add_special_tokens=False, return_tensors="pt")
    assert bare["input_ids"][0].tolist() == trained["input_ids"][0].tolist()
    assert torch.equal(bare["pixel_values"], trained["pixel_values"])
    assert torch.equal(served.image_processor(chart, return_tensors="pt")["pixel_values"], trained["pixel_values"])


def _model_folder_with(processor, folder):
    """`folder` made loadable by load_processor: the tiny model's config beside the saved processor."""
    from transformers import AutoConfig

    AutoConfig.from_pretrained(processor.tokenizer.name_or_path).save_pretrained(folder)
    return folder


def test_settings_without_pan_and_scan_are_refused_in_one_line():
    with pytest.raises(rlv.UsageError, match=r"^--pan_and_scan_max_crops sets how --pan_and_scan crops images"):
        script_args("--pan_and_scan_max_crops", "3")
    with pytest.raises(rlv.UsageError, match=r"^--pan_and_scan_min_ratio must be positive"):
        script_args("--pan_and_scan", "--pan_and_scan_min_ratio", "0")


def test_pan_and_scan_is_refused_for_a_family_without_crops(family_models, assets, tmp_path, capsys):
    argv = train_argv(assets, tmp_path, "--do_train", "--pan_and_scan", "--max_train_samples", "2")
    argv[argv.index("--model_name_or_path") + 1] = family_models["qwen2_5_vl"]
    assert rlv.cli(argv) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: --pan_and_scan applies to Gemma 3 only")


def test_one_question_mode_generates_from_the_image_and_its_crops(assets, tmp_path, monkeypatch, capsys):
    noise_image(256, 64).save(tmp_path / "wide_chart.png")
    seen = []
    process = rlv.ChatEncoder.process

    def recording_process(self, *args, **kwargs):
        processed = process(self, *args, **kwargs)
        image_tokens = int((processed["input_ids"] == self.image_token_id).sum())
        seen.append((tuple(processed["pixel_values"].shape), image_tokens))
        return processed

    monkeypatch.setattr(rlv.ChatEncoder, "process", recording_process)
    argv = ["--model_name_or_path", assets["model"], "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--predict_image", str(tmp_path / "wide_chart.png"), "--predict_question", "Which bar is tallest?",
            "--generation_max_new_tokens", "3", *CROP_FLAGS]
    assert rlv.cli(argv) == 0, capsys.readouterr().err[-2000:]
    assert seen == [((1 + 4, 3, 32, 32), (1 + 4) * 4)]
    assert capsys.readouterr().out.count("\n") == 1


def test_blank_pixel_rows_are_shaped_as_the_processor_shapes_an_image_or_crop(fresh_processor):
    encoder = collator_for(fresh_processor).encoder
    crops = fresh_processor.image_processor(noise_image(256, 64), return_tensors="pt", **PROCESSOR_CROP_KWARGS)
    blank = encoder.blank_pixel_rows(3)
    assert blank.shape == (3, *crops["pixel_values"].shape[1:]) and blank.dtype == crops["pixel_values"].dtype
    assert not blank.any()


def test_gaudi_image_rows_follow_the_lengths_and_the_rows_images(fresh_processor):
    from types import SimpleNamespace

    encoder = collator_for(fresh_processor, "--length_buckets", "32", "64", "1024", "--padding_strategy",
                           "bucket").encoder
    lazy_gaudi = SimpleNamespace(use_habana=True, use_lazy_mode=True, use_cpu=False)
    measured = rlv.IndexedRows(None, "train", np.arange(4), np.array([30, 50, 60, 2000]), np.array([1, 0, 3, 2]))
    # A row longer than --max_seq_length is cut to it, its images kept; a prompt may hold any row's images.
    assert rlv.gaudi_image_rows(encoder, {"train": measured}, lazy_gaudi) == rlv.GaudiImageRows(
        {32: 1, 64: 3, 1024: 3}, None, 3)
    unmeasured = rlv.IndexedRows(None, "train", np.arange(4))
    # Without measured rows: as many images as the length holds (image_seq_length tokens each, 4 in the tiny model).
    assert rlv.gaudi_image_rows(encoder, {"train": unmeasured}, lazy_gaudi) == rlv.GaudiImageRows(
        {32: 8, 64: 16, 1024: 256}, None, 256)
    # Eager mode compiles nothing per shape; --use_cpu runs upstream Gemma 3, whose check refuses blank images.
    for off in (dict(use_lazy_mode=False, use_cpu=False), dict(use_lazy_mode=True, use_cpu=True)):
        assert rlv.gaudi_image_rows(encoder, {"train": measured}, SimpleNamespace(use_habana=True, **off)) is None


def test_gaudi_generation_pads_every_prompt_batch_to_one_pixel_shape(fresh_processor):
    from transformers import GenerationConfig

    encoder = collator_for(fresh_processor).encoder
    evaluator = rlv.GenerationEvaluator(encoder, rlv.SkippedRows(None, "error"), script_args().evaluation,
                                        batch_size=2, prompt_lengths=[64, 128], image_rows_per_prompt=5)
    images_seen = []

    class RecordingModel:
        device = torch.device("cpu")
        generation_config = GenerationConfig(eos_token_id=1)

        def generate(self, **inputs):
            images_seen.append(len(inputs["pixel_values"]))
            return inputs["input_ids"]

    wide, square = noise_image(256, 64, 1), noise_image(64, 64, 2)  # 4 crops and none
    rows = [{"image": image, "question": "Which bar?", "answer": "B"} for image in (wide, square, square)]
    evaluator.generate(RecordingModel(), [feature(rows[0], 0), feature(rows[1], 1)])  # 5 + 1 images
    evaluator.generate(RecordingModel(), [feature(rows[2], 2)])  # 1 image, its copy filling the batch: 2
    assert images_seen == [2 * 5, 2 * 5]


def test_an_adapter_trained_with_crops_is_not_evaluated_without_them(assets, tmp_path, capsys):
    trained = train_argv(assets, tmp_path, "--do_train", "--max_steps", "1", "--max_train_samples", "8", *CROP_FLAGS)
    assert rlv.cli(trained) == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    evaluate = train_argv(assets, tmp_path, "--do_eval", "--max_eval_samples", "4")
    assert rlv.cli(evaluate) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (f"error: The adapter in {tmp_path} was trained on images and their pan-and-scan crops, which "
                       f"this run would not show it: add {' '.join(CROP_FLAGS)}")
    assert rlv.cli(evaluate + list(CROP_FLAGS)) == 0
