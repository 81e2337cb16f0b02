# Licensed under the Apache License, Version 2.0 (the "License").
"""What a real Gaudi run pays per step, the libraries' code included, counted at the ATen level (tests/aten_cost.py)
on real CLI runs through the habana_frameworks TEST DOUBLE: host syncs (value reads and data-dependent shapes, whoever
calls them: transformers, optimum-habana's ports, peft, accelerate, torch.optim, the script) and distinct step
signatures (shapes and dtypes of a micro-batch's inputs, images included, and of the ops it ran), i.e. lazy-mode
compiles.

* Gemma 3: 0 host syncs per plain optimizer step, in training and in evaluation; a deliberate `.item()` or boolean index
  in the loss is counted, at its site; at most one signature per length bucket.
* Qwen2.5-VL and LLaVA-NeXT on images of four sizes: the Gaudi default resizes every image to one size chosen from the
  data (logged), so at most one signature per length bucket, and the shape log shows the image shapes.
"""

import json

import pytest

import aten_cost


@pytest.fixture(scope="module")
def gemma3(assets, tmp_path_factory):
    """8 optimizer steps of batch 1 and accumulation 2, logging every 4; a deliberate `.item()` in the loss at step 2
    and a boolean index at step 6; then the loss over 4 evaluation rows in batches of 2."""
    workdir = tmp_path_factory.mktemp("gemma3_cost")
    argv = aten_cost.run_flags(
        assets["model"], assets["dataset"], workdir / "out", "--do_train", "--do_eval", "--max_train_samples", "16",
        "--max_eval_samples", "4", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--max_steps", "8", "--logging_steps", "4")
    (result,) = aten_cost.cost_run(workdir, argv, inject={2: "item", 6: "bool_index"})
    assert result["exit_code"] == 0, (workdir / "rank0.log").read_text()[-3000:]
    return result


@pytest.fixture(scope="module")
def varied_images(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("varied_images")
    return aten_cost.varied_image_sizes(assets["dataset"], folder / "chartqa")


def family_run(family_models, varied_images, tmp_path_factory, family: str) -> tuple:
    workdir = tmp_path_factory.mktemp(f"{family}_cost")
    argv = aten_cost.run_flags(family_models[family], varied_images, workdir / "out", "--do_train",
                               "--max_train_samples", "8", "--per_device_train_batch_size", "2", "--max_steps", "4")
    (result,) = aten_cost.cost_run(workdir, argv)
    log = (workdir / "rank0.log").read_text()
    assert result["exit_code"] == 0, log[-3000:]
    return result, log


def test_gemma3_plain_steps_make_no_host_sync_library_included(gemma3):
    steps = {step["step"]: step for step in gemma3["steps"]}
    assert sorted(steps) == list(range(1, 9))
    plain = [number for number, step in steps.items() if not step["sync_point"]]
    assert plain == [1, 2, 3, 5, 6, 7]
    for number in (1, 3, 5, 7):
        assert steps[number]["syncs"] == 0, steps[number]["sites"]
    # The host reads that are no device reads are seen and set apart: torch's optimizer step counters.
    assert any(site.startswith("_local_scalar_dense@") for site in gemma3["host_reads"]), gemma3["host_reads"]


def test_a_deliberate_item_or_boolean_index_in_the_step_is_counted(gemma3):
    steps = {step["step"]: step for step in gemma3["steps"]}
    # One per micro-batch (accumulation 2), where the loss is computed (TrainingLossMonitor.loss calls it).
    assert [site.split("@")[0] for site in steps[2]["sites"]] == ["_local_scalar_dense"] * 2
    assert [site.split("@")[0] for site in steps[6]["sites"]] == ["index"] * 2
    assert all(site.startswith(("_local_scalar_dense@run_lora_vlm.py", "index@run_lora_vlm.py"))
               and site.endswith(":loss") for site in steps[2]["sites"] + steps[6]["sites"])


def test_gemma3_logging_steps_read_what_they_log(gemma3):
    steps = {step["step"]: step for step in gemma3["steps"]}
    for number in (4, 8):
        assert steps[number]["sync_point"] and steps[number]["syncs"] >= 1
        assert any(":check_non_finite" in site for site in steps[number]["sites"])


def test_gemma3_evaluation_batches_make_no_host_sync(gemma3):
    batches = gemma3["batches"]["eval"]
    assert len(batches) == 2 and [batch["syncs"] for batch in batches] == [0, 0], [b["sites"] for b in batches]


def test_gemma3_step_signatures_stay_within_the_length_buckets(gemma3):
    buckets = gemma3["length_buckets"]
    train, evaluation = gemma3["batches"]["train"], gemma3["batches"]["eval"]
    assert len(train) == 16  # 8 steps of 2 micro-batches
    for batches in (train, evaluation):
        per_epoch = aten_cost.signatures_per_epoch(batches)
        assert per_epoch and all(1 <= count <= len(buckets) for count in per_epoch.values()), per_epoch
    # By the ops run: evaluation as by the inputs; a training micro-batch's backward creates the gradients at the
    # start of an accumulation window and adds to them after, two graphs per bucket. A step with a deliberate sync
    # runs other graphs (the sync splits one), which the ops show.
    assert aten_cost.signatures_per_epoch(evaluation, "graph") == aten_cost.signatures_per_epoch(evaluation)
    plain = [batch for batch in train if batch["step"] not in (2, 6)]
    assert all(count <= 2 * len(buckets) for count in aten_cost.signatures_per_epoch(plain, "graph").values())
    injected = [batch for batch in train if batch["step"] in (2, 6)]
    assert aten_cost.signatures_per_epoch(injected, "graph") == {1: 4}
    # Every micro-batch's length is a bucket.
    assert {batch["inputs"]["input_ids"][0][1] for batch in train + evaluation} <= set(buckets)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next"])
def test_dynamic_resolution_families_get_one_image_size_on_gaudi(family_models, varied_images, tmp_path_factory,
                                                                 family):
    import datasets

    sizes = {image.size for split in datasets.load_from_disk(varied_images).values() for image in split["image"]}
    assert len(sizes) == 4  # without one size, these images would give the batches four image shapes
    result, log = family_run(family_models, varied_images, tmp_path_factory, family)
    height, width = result["fixed_image_size"]
    assert f"Every image is resized to {height}x{width} (height x width) on Gaudi" in log
    train = result["batches"]["train"]
    assert len(train) == 4
    image_inputs = {json.dumps({k: v for k, v in batch["inputs"].items() if k in ("pixel_values", "image_grid_thw",
                                                                                  "image_sizes")}) for batch in train}
    assert len(image_inputs) == 1, image_inputs
    per_epoch = aten_cost.signatures_per_epoch(train)
    assert list(per_epoch) == [1] and per_epoch[1] <= len(result["length_buckets"])
    # The shape log names the image shapes.
    pixels = "x".join(map(str, train[0]["inputs"]["pixel_values"][0]))
    assert "1 distinct train batch shapes (" in log and f"pixel_values {pixels}" in log


def test_gemma3_crops_keep_one_image_shape_per_length_bucket(assets, tmp_path_factory):
    """--pan_and_scan on charts of four shapes (4, 0, 2 and 2 crops): the number of images and crops varies from row to
    row, and on Gaudi blank images pad each batch's to a number fixed per length bucket, logged."""
    import re

    folder = tmp_path_factory.mktemp("gemma3_crops")
    charts = aten_cost.varied_image_sizes(assets["dataset"], folder / "charts",
                                          sizes=((64, 256), (64, 64), (64, 128), (96, 64)))
    argv = aten_cost.run_flags(assets["model"], charts, folder / "out", "--do_train", "--max_train_samples", "8",
                               "--per_device_train_batch_size", "2", "--max_steps", "4", "--pan_and_scan",
                               "--pan_and_scan_min_crop_size", "16")
    (result,) = aten_cost.cost_run(folder, argv)
    log = (folder / "rank0.log").read_text()
    assert result["exit_code"] == 0, log[-3000:]
    logged = re.search(r"blank images pad each batch sequence's images and crops to (.*), as many as", log)
    assert logged, log[-3000:]
    per_row = {int(length): int(images) for images, length in re.findall(r"(\d+) at length (\d+)", logged.group(1))}
    buckets = result["length_buckets"]
    assert sorted(per_row) == buckets and len(set(per_row.values())) >= 2, per_row
    # The longest bucket holds every row: the most images, a 4:1 chart's 1 + 4.
    assert per_row[max(buckets)] == 5 and "5 per generation prompt" in logged.group(1)
    train = result["batches"]["train"]
    assert len(train) == 4
    for batch in train:
        rows, length = batch["inputs"]["input_ids"][0]
        assert batch["inputs"]["pixel_values"][0][0] == rows * per_row[length], batch["inputs"]
    per_epoch = aten_cost.signatures_per_epoch(train)
    assert list(per_epoch) == [1] and per_epoch[1] <= len(buckets)
