# Licensed under the Apache License, Version 2.0 (the "License").
"""Step overhead: run_lora_vlm.py's training loop against a plain PyTorch loop doing the same math.

The same model, LoRA, rows, collator, optimizer and loss in both; the plain loop is written here, by hand:

    for batch in DataLoader(rows, batch_size, shuffle, collate_fn=the project's collator):
        logits at the trained positions -> float32 cross-entropy / trained tokens -> backward
        -> clip the gradient norm to 1.0 (the Trainer's default) -> AdamW (fused, as the Trainer's default) -> zero

Each round runs one of the two for `steps` optimizer steps in this process; rounds alternate (CLI, plain, plain, CLI,
...) so that other load on the machine falls on both alike. A round's time runs from the end of its `warmup`-th step
to the end of its last (data loading and collation included, model loading and the first steps' warm-up not). The
figure is the median over rounds of plain time / CLI time: the CLI's samples/s as a share of the plain loop's.

    python tests/step_overhead.py [--rounds 6] [--steps 16] [--world_size 2]

With --world_size 2 both run on two CPU ranks under DDP (gloo), started by torchrun.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _path in (REPO_ROOT, TESTS_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

RATIO_TARGET = 0.95
RESULT_MARKER = "@@STEP_OVERHEAD@@ "
BATCH_SIZE = 4
LEARNING_RATE = 1e-3
# Gemma 3's 256 image tokens per image from a cheap vision tower: 128x128 pixels in 8x8 patches, not pooled.
IMAGE_SIZE, PATCH_SIZE, IMAGE_TOKENS = 128, 8, 256


def write_inputs(folder: Path) -> tuple[str, str]:
    """A random Gemma 3 (text: hidden 256, 4 layers; 256 image tokens per image) and a ChartQA-like set of 64 rows."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig
    from transformers import SiglipVisionConfig

    import tiny_assets

    tokenizer = tiny_assets.build_tokenizer()
    processor = Gemma3Processor(image_processor=tiny_assets.build_image_processor(IMAGE_SIZE), tokenizer=tokenizer,
                                chat_template=tiny_assets.GEMMA3_CHAT_TEMPLATE, image_seq_length=IMAGE_TOKENS)
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
        max_position_embeddings=2048, sliding_window=128, layer_types=["sliding_attention"] * 3 + ["full_attention"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos)
    vision = SiglipVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3, vision_use_head=False)
    config = Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=IMAGE_TOKENS,
        boi_token_index=tokenizer.convert_tokens_to_ids(tiny_assets.BOI_TOKEN),
        eoi_token_index=tokenizer.convert_tokens_to_ids(tiny_assets.EOI_TOKEN),
        image_token_index=tokenizer.image_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    model_dir, data_dir = folder / "model", folder / "data"
    model.save_pretrained(model_dir, safe_serialization=True)
    processor.save_pretrained(model_dir)
    tiny_assets.build_chartqa(n_train=64, n_val=8, n_test=8).save_to_disk(str(data_dir))
    return str(model_dir), str(data_dir)


def cli_argv(model_dir: str, data_dir: str, output_dir: str, steps: int) -> list[str]:
    return ["--model_name_or_path", model_dir, "--dataset_name", data_dir, "--output_dir", output_dir,
            "--overwrite_output_dir", "--do_train", "--max_steps", str(steps), "--per_device_train_batch_size",
            str(BATCH_SIZE), "--learning_rate", str(LEARNING_RATE), "--report_to", "none", "--save_strategy", "no",
            "--seed", "0", "--logging_steps", "1000"]


def cli_round(model_dir: str, data_dir: str, output_dir: str, steps: int, warmup: int) -> float:
    """Seconds from the end of step `warmup` to the end of the last step of a run of the script's main()."""
    import transformers

    import run_lora_vlm as rlv

    marks = {}

    class StepClock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, steps):
                marks[state.global_step] = time.perf_counter()

    build_trainer = rlv.build_trainer

    def build_and_time(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(StepClock())
        return trainer

    rlv.build_trainer = build_and_time
    try:
        rlv.main(rlv.parse_args(cli_argv(model_dir, data_dir, output_dir, steps)))
    finally:
        rlv.build_trainer = build_trainer
    return marks[steps] - marks[warmup]


def plain_round(model_dir: str, data_dir: str, steps: int, warmup: int) -> float:
    """The same training written as a plain loop; seconds over the same window as cli_round."""
    import torch
    from transformers import AutoModelForImageTextToText

    import run_lora_vlm as rlv

    # Set-up through the script's own pieces (so the model, LoRA, rows and collator are the very same); the loop
    # below is plain PyTorch.
    args = rlv.parse_args(cli_argv(model_dir, data_dir, "unused", steps))
    torch.manual_seed(0)
    _, family, processor = rlv.load_processor(args.model)
    splits, schema, base_dir = rlv.load_data(args.data, args.training, None)
    encoder = rlv.ChatEncoder(processor, family, schema, args.data, base_dir)
    collator = rlv.VisionChatCollator(encoder, args.data, rlv.SkippedRows(None))
    model = AutoModelForImageTextToText.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.config.use_cache = False
    model = rlv.apply_lora(model, args.lora, family)
    model.train()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    sampler = (torch.utils.data.DistributedSampler(splits["train"], seed=0) if distributed
               else torch.utils.data.RandomSampler(splits["train"], generator=torch.Generator().manual_seed(0)))
    loader = torch.utils.data.DataLoader(splits["train"], batch_size=BATCH_SIZE, sampler=sampler, collate_fn=collator)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0, fused=True)
    step, start = 0, None
    while step < steps:
        for batch in loader:
            labels, kept = batch.pop("labels"), batch["logits_to_keep"]
            batch.pop("row_ids")
            logits = model(**batch).logits  # at the kept positions only
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).index_select(1, kept)
            token_losses = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            (token_losses / (targets != -100).sum().clamp(min=1)).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == warmup:
                start = time.perf_counter()
            if step == steps:
                break
    return time.perf_counter() - start


def compare(workdir: Path, rounds: int = 6, steps: int = 16, warmup: int = 2) -> dict:
    """Alternating rounds in this process; returns the per-round seconds and the median ratio plain / CLI."""
    model_dir, data_dir = write_inputs(workdir)
    order = ["cli", "plain", "plain", "cli"] * ((rounds + 1) // 2)
    seconds = {"cli": [], "plain": []}
    for kind in order[: 2 * rounds]:
        if kind == "cli":
            seconds["cli"].append(cli_round(model_dir, data_dir, str(workdir / "out"), steps, warmup))
        else:
            seconds["plain"].append(plain_round(model_dir, data_dir, steps, warmup))
    ratios = [plain / cli for plain, cli in zip(seconds["plain"], seconds["cli"])]
    return {"seconds": seconds, "ratios": ratios, "ratio": statistics.median(ratios), "steps": steps,
            "warmup": warmup, "batch_size": BATCH_SIZE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each loop (default 6)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per round (default 16)")
    parser.add_argument("--world_size", type=int, default=1, help="ranks, under torchrun and DDP (default 1)")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.world_size > 1 and "LOCAL_RANK" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world_size}",
                   __file__, "--rounds", str(args.rounds), "--steps", str(args.steps)]
        return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if "LOCAL_RANK" in os.environ:
        import torch

        torch.distributed.init_process_group("gloo")
    with tempfile.TemporaryDirectory(prefix="step_overhead_") as tmp:
        workdir = Path(args.workdir or tmp)
        os.environ["HF_DATASETS_CACHE"] = str(workdir / "datasets_cache")
        result = compare(workdir, args.rounds, args.steps)
    if os.environ.get("RANK", "0") == "0":
        print(RESULT_MARKER + json.dumps(result), flush=True)
        print(f"CLI samples/s as a share of the plain loop's: {result['ratio']:.3f} (target >= {RATIO_TARGET})")
    return 0 if result["ratio"] >= RATIO_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
