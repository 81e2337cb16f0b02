# Licensed under the Apache License, Version 2.0 (the "License").
"""What the HPU path costs, measured on real CLI runs through the habana_frameworks TEST DOUBLE, and the loss
changes that cut it: logits only where the loss needs them, eval_loss as the per-token mean over the split, no
evaluation row dropped.

A cost run is `run_lora_vlm.py --use_habana --use_lazy_mode` in subprocesses (one per rank, torchrun-style
environment) whose PYTHONPATH starts with tests/habana_double, as in test_gaudi_path.py. Inside, `HostReads`
counts every read of a tensor's value by the host (`item`, `tolist`, `cpu`, `numpy`, `bool()`, `int()`,
`float()`, `index`): on an HPU each one waits for the device's queue to drain. A read is the script's when the
first caller outside torch is run_lora_vlm.py. Two kinds are not device reads and are set apart: anything
inside the collator (host data by construction; in real runs it is a dataloader worker's), and a CPU tensor
all-reduced over a gloo group other than the default one (host-to-host). The per-step ledger closes a step at
the next step's start, so a step's reads include its logging and saving; a step is a sync point when the
trainer logs, saves, evaluates or stops there. tests/benchmark.py section 6 prints the same measurements.
"""

import functools
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parent / "run_lora_vlm.py"
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


# ------------------------------------------------------------------------------------------------
# Cost runs (the parent side)


def cost_run(workdir: Path, argv: list, world_size: int = 1, script: Path = SCRIPT, sigterm_at: tuple = None) -> list:
    """Run `script` on `world_size` CPU ranks through the double; one result dict per rank.

    `sigterm_at=(rank, step)`: that rank sends itself SIGTERM at the end of that step (a preemption notice
    reaching one rank of a job).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    from conftest import habana_double_env, local_ranks_env

    env = {**habana_double_env(), "PT_HPU_LAZY_MODE": "1"}
    env.update(local_ranks_env(world_size))
    spec = json.dumps({"script": str(script), "out": str(workdir), "sigterm_at": sigterm_at})
    processes = []
    for rank in range(world_size):
        rank_env = {**env, **({"RANK": str(rank), "LOCAL_RANK": str(rank)} if world_size > 1 else {})}
        log = open(workdir / f"rank{rank}.log", "w")
        processes.append((subprocess.Popen([sys.executable, __file__, spec, *argv], env=rank_env, cwd=str(workdir),
                                           stdout=log, stderr=subprocess.STDOUT), log))
    results = []
    for rank, (process, log) in enumerate(processes):
        process.wait(timeout=600)
        log.close()
        out = workdir / f"rank{rank}.json"
        assert out.exists(), (workdir / f"rank{rank}.log").read_text()[-6000:]
        results.append({**json.loads(out.read_text()), "exit_code": process.returncode})
    return results


def run_flags(assets, output_dir, *extra) -> list:
    return ["--model_name_or_path", assets["model"], "--dataset_name", assets["dataset"], "--output_dir", str(output_dir),
            "--use_habana", "--use_lazy_mode", "--report_to", "none", "--seed", "0", "--learning_rate", "1e-3",
            "--dataloader_pin_memory", "False", *extra]


def plain_steps(result) -> list:
    return [s for s in result["steps"] if not s["sync_point"]]


# ------------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def two_ranks(assets, tmp_path_factory):
    """Two ranks, accumulation 2, logging every 4 steps; rank 1 alone is told to stop at step 5. Before training,
    5 rows are evaluated in batches of 2, with generation."""
    workdir = tmp_path_factory.mktemp("two_ranks")
    argv = run_flags(assets, workdir / "out", "--do_train", "--do_eval", "--eval_before_training", "--max_train_samples", "32",
                     "--max_eval_samples", "5", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "2",
                     "--gradient_accumulation_steps", "2", "--max_steps", "8", "--logging_steps", "4",
                     "--save_strategy", "steps", "--save_steps", "100", "--generation_eval", "--generation_max_new_tokens", "2")
    return cost_run(workdir, argv, world_size=2, sigterm_at=(1, 5))


def test_the_script_reads_no_device_value_between_sync_points_on_hpu(two_ranks):
    for result in two_ranks:
        plain = plain_steps(result)
        assert len(plain) >= 3, result["steps"]
        assert [s["script_reads"] for s in plain] == [0] * len(plain), [s["script_sites"] for s in plain]
        # The counter does see the script's reads: the non-finite check at the logging step reads the flag.
        assert result["steps"][3]["sync_point"] and result["steps"][3]["script_reads"] >= 1
        # Preemption is still agreed on after every step, host to host.
        assert all(s["host_collective_reads"] == 1 for s in result["steps"]), result["steps"]


def test_one_rank_preempted_stops_every_rank_at_the_same_step(two_ranks):
    assert [r["exit_code"] for r in two_ranks] == [143, 143]
    assert [r["stopped_at_step"] for r in two_ranks] == [5, 5]
    assert all(len(r["steps"]) == 5 for r in two_ranks)


def test_eval_loss_on_hpu_is_the_per_token_mean_over_the_split(two_ranks, assets):
    # Five rows on two ranks in batches of two: accelerate repeats a row to fill rank 1's last batch.
    losses = [r["metrics"]["eval_before_loss"] for r in two_ranks]
    assert losses[0] == losses[1] == pytest.approx(per_token_eval_loss(assets, 5), rel=1e-5)


def test_hpu_batches_keep_few_shapes_and_logits_only_where_trained(two_ranks):
    for result in two_ranks:
        train, evaluation = result["shapes"]["train"], result["shapes"]["eval"]
        assert sum(train.values()) == 10 and 1 <= len(train) <= 4  # 5 steps of 2 micro-batches
        assert sum(evaluation.values()) == 2 and len(evaluation) == 1  # 3 batches of 5 rows: the ranks' last one filled
        for shape in list(train) + list(evaluation):
            (batch, length), (kept,) = json.loads(shape)
            assert kept in (16, 32, 64, 128) and kept <= length, shape
        # Generation prompts are left-padded to the bucket lengths: at most one shape per bucket, each a bucket.
        prompt_lengths = [json.loads(shape)[1] for shape in result["prompt_shapes"]]
        assert sum(result["prompt_shapes"].values()) >= 1 and len(prompt_lengths) <= len(result["length_buckets"])
        assert set(prompt_lengths) <= set(result["length_buckets"]), (prompt_lengths, result["length_buckets"])
        # optimum-habana's generation options reach generate(): lazy mode and static shapes (HPU graphs need the flag).
        assert result["generate_options"] == {"lazy_mode": True, "hpu_graphs": False, "static_shapes": True}


def test_a_nan_loss_is_reported_at_the_next_logging_step_and_never_reaches_the_weights(assets, tmp_path, monkeypatch):
    import run_lora_vlm as rlv
    from conftest import run_training, train_argv

    calls, trainers = {"n": 0}, []
    original_loss, original_build = rlv.causal_lm_loss, rlv.build_trainer

    def nan_at_third_training_batch(outputs, labels, num_items_in_batch=None):
        loss = original_loss(outputs, labels, num_items_in_batch)
        calls["n"] += torch.is_grad_enabled()
        return loss * float("nan") if torch.is_grad_enabled() and calls["n"] == 3 else loss

    monkeypatch.setattr(rlv, "causal_lm_loss", nan_at_third_training_batch)
    monkeypatch.setattr(rlv, "build_trainer", lambda *a, **k: trainers.append(original_build(*a, **k)) or trainers[-1])
    argv = train_argv(assets, tmp_path, "--do_train", "--max_train_samples", "24", "--per_device_train_batch_size", "2",
                      "--max_steps", "6", "--logging_steps", "4", "--optim", "sgd")
    with pytest.raises(FloatingPointError, match=r"\(nan\) at training step 3, train rows \[\d+, \d+\] \(1 batch with a "
                                                 r"non-finite loss in steps 1-4, each contributing no gradient\)"):
        run_training(argv)
    assert trainers[0].state.global_step == 4  # stopped at the check, not at the bad batch
    assert all(torch.isfinite(p).all() for p in trainers[0].model.parameters())


def test_logits_at_kept_positions_give_todays_loss_and_lora_gradients(assets):
    import run_lora_vlm as rlv

    model, batch = lora_model_and_batch(assets, rows=4)
    labels, kept = batch.pop("labels"), batch.pop("logits_to_keep")
    assert len(kept) == 16 and kept.max() < labels.shape[1]
    window = int((labels != rlv.IGNORE_INDEX).sum()) * 3  # as if 3 micro-batches were accumulated
    results = []
    for keep in (None, kept):
        model.zero_grad(set_to_none=True)
        outputs = model(**batch, **({} if keep is None else {"logits_to_keep": keep}))
        assert outputs.logits.shape[1] == (labels.shape[1] if keep is None else 16)
        loss = rlv.causal_lm_loss(outputs, labels if keep is None else rlv.labels_at_kept_positions(labels, keep), window)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (full_loss, full_grads), (kept_loss, kept_grads) = results
    assert torch.allclose(kept_loss, full_loss, rtol=1e-6, atol=0)
    assert full_grads.keys() == kept_grads.keys() and len(full_grads) > 0
    for name, grad in full_grads.items():
        assert torch.allclose(kept_grads[name], grad, rtol=1e-5, atol=1e-7), name
    assert any(g.abs().sum() > 0 for g in full_grads.values())


def test_loss_memory_follows_trained_tokens_not_sequence_length():
    measured = measure_loss_cost(vocab_size=16_384, hidden_size=64, layers=1, batch=2, length=512, repeats=0)
    assert measured["kept"]["loss"] == pytest.approx(measured["full"]["loss"], rel=1e-5)
    # Full logits alone are batch x length x vocab floats, 64 MiB here, and the loss holds several such.
    assert measured["full"]["peak_bytes"] > 2 * 512 * 16_384 * 4
    assert measured["kept"]["peak_bytes"] < measured["full"]["peak_bytes"] / 4


def test_eval_loss_on_cpu_is_the_per_token_mean_and_no_row_is_dropped(assets, tmp_path):
    import run_lora_vlm as rlv
    from conftest import run_training, train_argv

    seen = []
    original = rlv.VisionChatCollator.__call__

    def recording(self, features):
        seen.extend(f["row_index"] for f in features)
        return original(self, features)

    rlv.VisionChatCollator.__call__ = recording
    try:
        # 6 rows in batches of 4: batch means weigh the 2-row batch like the 4-row one.
        argv = train_argv(assets, tmp_path, "--do_eval", "--max_eval_samples", "6", "--per_device_eval_batch_size", "4",
                          "--dataloader_drop_last")
        trainer = run_training(argv)
    finally:
        rlv.VisionChatCollator.__call__ = original
    # The sample row logged before the model loads (the first eval row: no train split), then the 6 rows in order.
    assert seen == [0, 0, 1, 2, 3, 4, 5]
    metrics = json.loads((tmp_path / "eval_results.json").read_text())
    per_row = per_row_losses(assets["model"], assets["dataset"])
    expected = sum(s for s, _ in per_row) / sum(n for _, n in per_row)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    batch_means = [sum(s for s, _ in b) / sum(n for _, n in b) for b in (per_row[:4], per_row[4:])]
    # What the trainer alone reports (the mean of batch means) would fail the check above.
    assert (4 * batch_means[0] + 2 * batch_means[1]) / 6 != pytest.approx(expected, rel=1e-5)
    assert trainer.args.dataloader_drop_last  # training batches still drop the short last one


# ------------------------------------------------------------------------------------------------
# Independent references and the loss measurement (also used by tests/benchmark.py)


@functools.lru_cache(maxsize=None)
def per_row_losses(assets_model: str, assets_dataset: str, num_rows: int = 6) -> list:
    """(sum of token losses, trained tokens) for each of the first `num_rows` validation rows, one row at a
    time through the reference model with full logits and a plain cross-entropy."""
    import datasets
    from transformers import AutoModelForImageTextToText

    import run_lora_vlm as rlv

    processor = rlv.load_processor(rlv.ModelArguments(model_name_or_path=assets_model))[2]
    model = AutoModelForImageTextToText.from_pretrained(assets_model).eval()
    data = datasets.load_from_disk(assets_dataset)
    split = "val" if "val" in data else "validation"
    collator = encoding_collator(processor, data[split])
    results = []
    for index in range(num_rows):
        batch = collator([{"row": data[split][index], "split": split, "row_index": index}])
        labels = batch["labels"][0]
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "row_ids", "logits_to_keep")}).logits[0]
        trained = torch.nonzero(labels[1:] != rlv.IGNORE_INDEX).flatten()
        token_losses = torch.nn.functional.cross_entropy(logits[trained].double(), labels[trained + 1], reduction="none")
        results.append((float(token_losses.sum()), len(trained)))
    return results


def per_token_eval_loss(assets, num_rows: int) -> float:
    rows = per_row_losses(assets["model"], assets["dataset"])[:num_rows]
    return sum(s for s, _ in rows) / sum(n for _, n in rows)


def encoding_collator(processor, rows):
    """The script's collator with its default flags, here only to encode rows (labels on the assistant tokens)."""
    from conftest import make_collator, script_args

    return make_collator(processor, script_args().data, rows.column_names)


def lora_model_and_batch(assets, rows: int):
    import datasets
    from conftest import script_args
    from transformers import AutoModelForImageTextToText

    import run_lora_vlm as rlv

    processor = rlv.load_processor(rlv.ModelArguments(model_name_or_path=assets["model"]))[2]
    data = datasets.load_from_disk(assets["dataset"])["train"]
    batch = encoding_collator(processor, data)([{"row": data[i], "split": "train", "row_index": i} for i in range(rows)])
    batch.pop("row_ids")
    args = script_args("--lora_dropout", "0")
    torch.manual_seed(0)
    model = rlv.apply_lora(AutoModelForImageTextToText.from_pretrained(assets["model"]), args.lora, rlv.model_family("gemma3"))
    for name, parameter in model.named_parameters():  # lora_B starts at zero: move it so lora_A gets a gradient too
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model, batch


def measure_loss_cost(vocab_size=16_384, hidden_size=256, layers=2, batch=4, length=512, trained_per_row=6,
                      repeats=3, seed=0) -> dict:
    """Peak CPU memory and time of one training micro-step's loss with full logits and with kept positions.

    A random Gemma 3 text model with Gemma's vocabulary-to-hidden ratio (262k / 3840 is 68; 16k / 256 is 64)
    and rows padded to `length`, each training `trained_per_row` tokens at the end of its ~55%-long content.
    "loss" times the LM head, the loss and their backward from the last hidden states, which is what the kept
    positions change; "step" the whole forward and backward. Peak memory is the CPU allocator's, from the
    profiler's memory events over the loss part.
    """
    from torch.profiler import ProfilerActivity, profile
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    import run_lora_vlm as rlv

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=hidden_size // 4, sliding_window=512, max_position_embeddings=2 * length)
    model = Gemma3ForCausalLM(config).train()
    input_ids = torch.randint(10, vocab_size, (batch, length))
    labels = torch.full((batch, length), rlv.IGNORE_INDEX)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for row in range(batch):
        content = length * 55 // 100 + 7 * row
        attention_mask[row, :content] = 1
        labels[row, content - trained_per_row:content] = input_ids[row, content - trained_per_row:content]
    kept = rlv.kept_logit_positions(labels)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def loss_part(keep):
        states = hidden.detach().requires_grad_()
        logits = model.lm_head(states if keep is None else states[:, keep])
        loss = rlv.causal_lm_loss({"logits": logits}, labels if keep is None else rlv.labels_at_kept_positions(labels, keep))
        loss.backward()
        return float(loss.detach())

    def whole_step(keep):
        model.zero_grad(set_to_none=True)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, **({} if keep is None else {"logits_to_keep": keep}))
        loss = rlv.causal_lm_loss(outputs, labels if keep is None else rlv.labels_at_kept_positions(labels, keep))
        loss.backward()

    measured = {}
    for name, keep in (("full", None), ("kept", kept)):
        loss_part(keep)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = loss_part(keep)
        loss_times, step_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            loss_part(keep)
            loss_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            whole_step(keep)
            step_times.append(time.perf_counter() - start)
        measured[name] = {"loss": loss, "peak_bytes": allocator_peak(prof), "loss_seconds": min(loss_times, default=None),
                          "step_seconds": min(step_times, default=None), "logit_rows": batch * (length if keep is None else len(keep))}
    measured["shape"] = {"vocab": vocab_size, "hidden": hidden_size, "layers": layers, "batch": batch, "length": length,
                         "trained_tokens": batch * trained_per_row, "kept": len(kept)}
    return measured


def allocator_peak(prof) -> int:
    """Highest CPU allocator footprint, relative to the start, from a profile taken with profile_memory."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


# ------------------------------------------------------------------------------------------------
# The subprocess side: python test_gaudi_cost.py SPEC_JSON ARGV...


class HostReads:
    """Counts the host's reads of tensor values, attributed to the first caller outside torch."""

    def __init__(self, script: str):
        self.script = os.path.realpath(script)
        self.torch_dir = os.path.dirname(torch.__file__)
        self.in_collator = False
        self.host_tensors = set()  # ids of CPU tensors reduced over a gloo side group, alive
        self.script_sites, self.other_reads, self.host_collective_reads = [], 0, 0

    def install(self) -> None:
        for name in READS:
            setattr(torch.Tensor, name, self.counting(getattr(torch.Tensor, name), name))
        all_reduce = torch.distributed.all_reduce

        def reduce(tensor, *args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            if group is not None and group is not torch.distributed.GroupMember.WORLD and tensor.device.type == "cpu" \
                    and torch.distributed.get_backend(group) == "gloo":
                key = id(tensor)
                self.host_tensors.add(key)
                weakref.finalize(tensor, self.host_tensors.discard, key)
            return all_reduce(tensor, *args, **kwargs)

        torch.distributed.all_reduce = reduce

    def counting(self, method, name):
        def read(tensor, *args, **kwargs):
            self.note(tensor, name)
            return method(tensor, *args, **kwargs)

        return read

    def note(self, tensor, name) -> None:
        if self.in_collator:
            return
        if id(tensor) in self.host_tensors:
            self.host_collective_reads += 1
            return
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(self.torch_dir):
            frame = frame.f_back
        if frame is not None and os.path.realpath(frame.f_code.co_filename) == self.script:
            self.script_sites.append(f"{frame.f_code.co_name}:{frame.f_lineno}:{name}")
        else:
            self.other_reads += 1

    def totals(self) -> tuple:
        return len(self.script_sites), self.other_reads, self.host_collective_reads


def _measure(spec: dict, argv: list) -> None:
    import collections
    import signal

    import transformers

    import habana_frameworks

    assert habana_frameworks.IS_TEST_DOUBLE
    reads = HostReads(spec["script"])
    reads.install()
    sys.path.insert(0, os.path.dirname(spec["script"]))
    import run_lora_vlm as rlv

    shapes = {"train": collections.Counter(), "eval": collections.Counter()}
    prompt_shapes = collections.Counter()
    steps = []
    result = {"steps": steps, "shapes": shapes, "prompt_shapes": prompt_shapes}
    rank = int(os.environ.get("RANK", "0"))

    class Ledger(transformers.TrainerCallback):
        def __init__(self):
            self.open = None

        def close(self):
            if self.open is not None:
                script, other, host = (now - then for now, then in zip(reads.totals(), self.open.pop("start")))
                self.open.update(script_reads=script, other_reads=other, host_collective_reads=host,
                                 script_sites=reads.script_sites[len(reads.script_sites) - script:])
                steps.append(self.open)
                self.open = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.close()
            self.open = {"step": state.global_step + 1, "start": reads.totals(), "sync_point": False}

        def on_step_end(self, args, state, control, **kwargs):
            self.open["sync_point"] = bool(control.should_log or control.should_save or control.should_evaluate
                                           or control.should_training_stop)

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

    class Preempt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if spec["sigterm_at"] == [rank, state.global_step]:
                os.kill(os.getpid(), signal.SIGTERM)

    def in_collator(call):
        def collate(self, features):
            reads.in_collator = True
            try:
                return call(self, features)
            finally:
                reads.in_collator = False

        return collate

    def record_shapes(module, args, kwargs):
        kept = kwargs.get("logits_to_keep")
        key = [list(kwargs["input_ids"].shape), list(kept.shape) if torch.is_tensor(kept) else None]
        shapes["train" if torch.is_grad_enabled() else "eval"][json.dumps(key)] += 1

    build_trainer = rlv.build_trainer

    def build_and_watch(model, *args, **kwargs):
        trainer = build_trainer(model, *args, **kwargs)
        # The signal comes before the script's handlers look at the step's end; the ledger reads the flags last.
        trainer.callback_handler.callbacks.insert(0, Preempt())
        trainer.add_callback(Ledger())
        model.register_forward_pre_hook(record_shapes, with_kwargs=True)
        generating = model.get_base_model()
        generate = generating.generate

        def recording_generate(*args, **kwargs):
            prompt_shapes[json.dumps(list(kwargs["input_ids"].shape))] += 1
            result["generate_options"] = {k: kwargs.get(k) for k in ("lazy_mode", "hpu_graphs", "static_shapes")}
            return generate(*args, **kwargs)

        generating.generate = recording_generate
        result["trainer"] = trainer
        return trainer

    rlv.build_trainer = build_and_watch
    evaluate_split, metrics = rlv.evaluate_split, {}

    def recording_evaluate_split(*args, **kwargs):
        evaluated = evaluate_split(*args, **kwargs)
        metrics.update({k: v for k, v in evaluated.items() if k.endswith("_loss")})
        return evaluated

    rlv.evaluate_split = recording_evaluate_split
    rlv.VisionChatCollator.__call__ = in_collator(rlv.VisionChatCollator.__call__)
    exit_code = 0
    try:
        rlv.main(rlv.parse_args(argv))
    except SystemExit as e:
        exit_code = e.code
    trainer = result.pop("trainer")
    handler = next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "PreemptionHandler"), None)
    result.update(stopped_at_step=getattr(handler, "stopped_at_step", None), metrics=metrics,
                  length_buckets=trainer.data_collator.data_args.length_buckets,
                  classes=[c.__name__ for c in type(trainer).__mro__])
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(result))
    sys.exit(exit_code)


if __name__ == "__main__":
    _measure(json.loads(sys.argv[1]), sys.argv[2:])
