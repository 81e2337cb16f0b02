# Licensed under the Apache License, Version 2.0 (the "License").
"""What a real HPU would pay per step, counted at the ATen level on CPU runs through the habana_frameworks TEST DOUBLE.

`AtenCost` is a TorchDispatchMode: it sees every ATen op, whoever calls it (the script, transformers, optimum-habana's
Gemma 3 port, peft, accelerate, torch.optim), after autograd, so the backward pass too. It counts two things.

Host syncs: every op that needs a device value on the host, or whose output shape depends on the data (in lazy mode
both end the graph and wait for the device):
* value reads: `_local_scalar_dense` (`item()`, `bool()`, `int()`, `float()`, `if tensor:`), and any op that returns a
  Python scalar computed from the data (`equal`, `is_nonzero`, ...);
* data-dependent shapes: `nonzero`, `masked_select`, the `unique` family, `bincount`, `repeat_interleave` without
  `output_size`, and `index` / `index_put` with a boolean index (`x[mask]`, `x[mask] = v`);
* host copies the dispatcher cannot see on a CPU-only machine, since on the double a "device" tensor already is a CPU
  tensor: `tolist()`, `numpy()`, `__array__`, `cpu()`, `to("cpu")`, counted at the Python level.
Not counted, by construction host data: anything inside the collator and the data loader (a dataloader worker's work on
real runs, and the sampler's CPU generator); host tensors: a `.cpu()` / `.to("cpu")` copy (counted once, as the copy),
whatever is computed from host tensors only, a CPU tensor all-reduced over a gloo group of its own (the preemption
flag), and torch's optimizer step counters, which torch keeps on the host for non-capturable optimizers
(torch/optim/adam.py `_init_group`: `torch.tensor(0.0)` without a device). Factory calls (`torch.zeros`, `torch.tensor`)
cannot be told apart from device ones on the double, so they count as device tensors: the counter errs towards more
syncs, never fewer. Ops on host tensors are no part of any HPU graph.

Step signatures: lazy mode accumulates ops until `mark_step` (or a sync) and compiles each distinct graph once, so
each distinct signature of a micro-batch is a compile. Two are recorded per training micro-batch (from its
`training_step` to the trainer's `mark_step` after it, its backward included) and per evaluation batch (its
`prediction_step`): "inputs", the shapes and dtypes of the batch's tensors (images and kept logit positions included),
and "graph", the signatures of the segments it ran between graph breaks, each hashed from its ops' names, tensor
shapes and dtypes and integer arguments (floats, such as learning rates, are graph inputs). The graph signature also
sees what the inputs do not (a Python branch, a data-dependent shape inside the model), and what a real HPU compiles
once more, e.g. a backward that adds to existing gradients in an accumulation window. `graphs` counts every distinct
segment of the run.

Run a measured CLI run with `cost_run` (subprocesses, one per rank, the double first on PYTHONPATH); the subprocess
side is `python tests/aten_cost.py SPEC_JSON ARGV...`.
"""

import collections
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = Path(__file__).resolve().parent
SCRIPT = HERE.parent / "run_lora_vlm.py"
aten = torch.ops.aten

# Ops whose output shape depends on the data (each needs the device's values on the host to size its output).
DATA_DEPENDENT_SHAPE = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                        "unique_dim_consecutive", "bincount", "histogramdd", "_nested_tensor_from_mask"}
# Ops returning a Python scalar from metadata alone (sizes, strides, flags), never from values.
METADATA_SCALARS = {"is_same_size", "is_coalesced", "_nnz", "dense_dim", "sparse_dim", "_dimI", "_dimV", "size",
                    "stride", "numel", "dim", "storage_offset", "is_contiguous", "is_strides_like_format",
                    "is_non_overlapping_and_dense", "_has_compatible_shallow_copy_type", "is_pinned", "is_set_to",
                    "_debug_has_internal_overlap", "is_complex", "is_floating_point", "is_signed", "is_conj", "is_neg",
                    "is_inference", "_is_zerotensor", "output_nr", "_version", "sym_size", "sym_stride", "sym_numel",
                    "sym_storage_offset", "is_leaf", "requires_grad_", "retains_grad", "_nested_tensor_size"}
SCALAR_TYPES = {"bool", "int", "float", "Scalar", "SymInt", "SymFloat", "SymBool", "number", "complex"}
HOST_READS = ("tolist", "numpy", "__array__")


def sync_kind(func, args, kwargs):
    """Why `func(*args, **kwargs)` would make the host wait for the device ('value', 'shape'), or None."""
    name = func._schema.name.split("::")[-1]
    if name == "_local_scalar_dense":
        return "value"
    if name in DATA_DEPENDENT_SHAPE:
        return "shape"
    if name == "repeat_interleave" and torch.is_tensor(args[0]) and args[0].dim() > 0:
        output_size = kwargs.get("output_size", args[-1] if len(args) > 1 and not torch.is_tensor(args[-1]) else None)
        return "shape" if output_size is None else None
    if name in ("index", "_unsafe_index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return "shape"
        return None
    returns = func._schema.returns
    if returns and all(str(r.type) in SCALAR_TYPES for r in returns) and name not in METADATA_SCALARS:
        return "value"
    return None


def caller_site(skip_dirs) -> str:
    """file:line:function of the first frame outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(skip_dirs):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}:{frame.f_code.co_name}"


def op_key(func, args, kwargs) -> tuple:
    """What makes an op a different graph node: its name, its tensors' shapes and dtypes, its integer arguments
    (shapes, dims, slices); floating-point scalars (learning rates) are graph inputs, not part of the graph."""
    leaves, _ = tree_flatten((args, kwargs))
    key = [str(func)]
    for leaf in leaves:
        if torch.is_tensor(leaf):
            key.append((tuple(leaf.shape), str(leaf.dtype)))
        elif isinstance(leaf, float):
            key.append("float")
        elif isinstance(leaf, (bool, int, str, type(None), torch.dtype, torch.device, torch.memory_format)):
            key.append(leaf if not isinstance(leaf, (torch.dtype, torch.device, torch.memory_format)) else str(leaf))
        else:
            key.append(type(leaf).__name__)
    return tuple(key)


class AtenCost(TorchDispatchMode):
    """Counts host syncs and hashes lazy-mode graph segments; see the module docstring."""

    def __init__(self):
        super().__init__()
        self.paused = 0  # > 0 inside the collator
        self.events = []  # (kind, op, site)
        self.host_reads = collections.Counter()  # "op@site": reads of host tensors, set apart (not syncs)
        self.host_tensors = set()  # ids of live host tensors (see mark_host)
        self.optimizers = []  # torch optimizers whose non-capturable step counters are host tensors
        self.segment = []  # hashes of the ops since the last graph break (mark_step or sync)
        self.graphs = set()  # every distinct segment signature: the graphs a real HPU compiles
        self.mark_steps = 0
        self.on_segment = None  # called with each closed segment's signature
        self.skip_dirs = (os.path.dirname(torch.__file__), os.path.abspath(__file__))

    # --- host syncs
    def mark_host(self, tensor) -> None:
        """`tensor` lives on the host on a real Gaudi: a copy the code made with .cpu() or .to("cpu"), a result of
        ops on host tensors only, or the preemption flag. Reading it is no sync, and its ops are no HPU graph."""
        key = id(tensor)
        if key not in self.host_tensors:
            self.host_tensors.add(key)
            weakref.finalize(tensor, self.host_tensors.discard, key)

    def is_host_tensor(self, tensor) -> bool:
        if id(tensor) in self.host_tensors:
            return True
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                if group.get("capturable") or group.get("fused"):
                    continue
                for parameter in group["params"]:
                    step = optimizer.state.get(parameter, {}).get("step")
                    if step is tensor:
                        return True
        return False

    def note(self, kind: str, op: str, tensor=None) -> bool:
        """Count a sync unless it reads host data; True if counted."""
        if self.paused:
            return False
        if tensor is not None and self.is_host_tensor(tensor):
            self.host_reads[f"{op}@{caller_site(self.skip_dirs)}"] += 1
            return False
        self.events.append((kind, op, caller_site(self.skip_dirs)))
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        leaves = tree_flatten((args, kwargs))[0]
        inputs = [leaf for leaf in leaves if torch.is_tensor(leaf)]
        if inputs and all(id(tensor) in self.host_tensors for tensor in inputs):
            out = func(*args, **kwargs)
            for tensor in tree_flatten(out)[0]:
                if torch.is_tensor(tensor):
                    self.mark_host(tensor)
            return out
        kind = sync_kind(func, args, kwargs)
        self.segment.append(hash(op_key(func, args, kwargs)))
        synced = kind is not None and self.note(kind, func._schema.name.split("::")[-1],
                                                args[0] if args and torch.is_tensor(args[0]) else None)
        if synced:
            # In lazy mode the host waits for this op's result: the graph accumulated so far runs here.
            self.close_segment()
        return func(*args, **kwargs)

    def close_segment(self) -> None:
        if not self.segment:
            return
        signature = hash(tuple(self.segment))
        self.segment = []
        self.graphs.add(signature)
        if self.on_segment is not None:
            self.on_segment(signature)

    def mark_step(self) -> None:
        self.mark_steps += 1
        self.close_segment()

    # --- installation
    def install(self) -> None:
        """Host copies counted at the Python level, the gloo side channel's tensors noted, mark_step hooked."""
        for name in HOST_READS:
            setattr(torch.Tensor, name, self.counting(getattr(torch.Tensor, name), name))
        torch.Tensor.cpu = self.copying_to_host(torch.Tensor.cpu, "cpu")
        torch.Tensor.to = self.copying_to_host(torch.Tensor.to, "to")
        all_reduce = torch.distributed.all_reduce

        def reduce(tensor, *args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            if group is not None and group is not torch.distributed.GroupMember.WORLD and tensor.device.type == "cpu" \
                    and torch.distributed.get_backend(group) == "gloo":
                self.mark_host(tensor)
            return all_reduce(tensor, *args, **kwargs)

        torch.distributed.all_reduce = reduce
        import habana_frameworks.torch.core as htcore

        mark_step = htcore.mark_step

        def marking(*args, **kwargs):
            self.mark_step()
            return mark_step(*args, **kwargs)

        htcore.mark_step = marking

    def counting(self, method, name):
        def read(tensor, *args, **kwargs):
            self.note("host_copy", name, tensor)
            return method(tensor, *args, **kwargs)

        return read

    def copying_to_host(self, method, name):
        """.cpu(), .to("cpu"), .to(device="cpu"): on a Gaudi a device-to-host copy (a sync), whose result is a host
        tensor. Only the literal "cpu" counts: a torch.device taken from a tensor (`.to(x.device)`) is the HPU there."""
        def copy(tensor, *args, **kwargs):
            target = args[0] if args and isinstance(args[0], str) else kwargs.get("device")
            if self.paused or (name == "to" and target != "cpu") or id(tensor) in self.host_tensors:
                return method(tensor, *args, **kwargs)
            self.note("host_copy", f"{name}(cpu)", tensor)
            out = method(tensor, *args, **kwargs)
            if out is tensor:  # on the double the tensor already is on the CPU; a real copy is a new tensor
                self.paused += 1
                try:
                    out = out.clone()
                finally:
                    self.paused -= 1
            self.mark_host(out)
            return out

        return copy

    def pausing(self, call):
        def paused(*args, **kwargs):
            self.paused += 1
            try:
                return call(*args, **kwargs)
            finally:
                self.paused -= 1

        return paused


class Ledger:
    """Per optimizer step, the syncs (a step's window runs from its on_step_begin to the next one, so its logging and
    saving are in it); per training micro-batch and evaluation batch, the graph signature and syncs."""

    def __init__(self, cost: AtenCost):
        self.cost = cost
        self.steps = []  # {"step", "epoch", "sync_point", "syncs", "sites"}
        self.open_step = None
        self.batches = {"train": [], "eval": []}  # {"epoch", "step", "inputs", "graph", and for eval "syncs", "sites"}
        self.region = None  # the batch whose segments are being collected
        self.closing = False  # the region ends at the next mark_step
        self.open_eval = None
        cost.on_segment = self.segment

    def segment(self, signature) -> None:
        if self.region is not None:
            self.region["graph"].append(signature)
            if self.closing:
                self.region, self.closing = None, False

    def close_step(self) -> None:
        if self.open_step is not None:
            start = self.open_step.pop("start")
            events = self.cost.events[start:]
            self.open_step.update(syncs=len(events), sites=[f"{op}@{site}" for _, op, site in events])
            self.steps.append(self.open_step)
            self.open_step = None

    def begin_step(self, step: int, epoch: float) -> None:
        self.close_step()
        self.open_step = {"step": step, "epoch": epoch, "start": len(self.cost.events), "sync_point": False}

    def begin_batch(self, stage: str, epoch: float, inputs: dict, step: int = 0) -> None:
        # The batch's signature covers its own ops: what ran since the last graph break (the step's callbacks, the
        # tail of a logging step) is set apart here. On an HPU it joins the batch's first graph, so it may compile
        # that graph once more per variant; those compiles are counted in `graphs`, not in the batch signatures.
        self.cost.close_segment()
        described = {k: [list(v.shape), str(v.dtype).replace("torch.", "")]
                     for k, v in inputs.items() if torch.is_tensor(v)}
        self.region = {"epoch": epoch, "step": step, "graph": [], "inputs": described}
        self.closing = False
        self.batches[stage].append(self.region)

    def end_batch(self, stage: str) -> None:
        """A training micro-batch's last segment (its backward) is the one the trainer's next mark_step closes; an
        evaluation batch ends with prediction_step, which marks the step itself in lazy mode."""
        if stage == "train":
            self.closing = self.region is not None
        else:
            self.cost.close_segment()
            self.region = None

    def close_eval(self) -> None:
        if self.open_eval is not None:
            record, start = self.open_eval
            events = self.cost.events[start:]
            record.update(syncs=len(events), sites=[f"{op}@{site}" for _, op, site in events])
            self.open_eval = None

    def begin_eval_batch(self, epoch: float, inputs: dict) -> None:
        self.close_eval()
        self.begin_batch("eval", epoch, inputs)
        self.open_eval = (self.region, len(self.cost.events))


def signatures_per_epoch(batches: list, key: str = "inputs") -> dict:
    """{epoch number (1-based): distinct batch signatures in it}: by the shapes and dtypes of the batch's inputs
    (`key` "inputs", what a lazy-mode graph is compiled for), or by the ops the batch ran ("graph")."""
    per_epoch = collections.defaultdict(set)
    for batch in batches:
        per_epoch[int(batch["epoch"]) + 1].add(json.dumps(batch[key], sort_keys=True))
    return {epoch: len(signatures) for epoch, signatures in sorted(per_epoch.items())}


# ------------------------------------------------------------------------------------------------
# Runs (the parent side)


def cost_run(workdir: Path, argv: list, world_size: int = 1, inject: dict = None, timeout: int = 900,
             script: Path = SCRIPT) -> list:
    """`script` (run_lora_vlm.py or another version of it) with `argv` on `world_size` CPU ranks through the double,
    counted; one result dict per rank.

    `inject`: {"step": kind} adds a deliberate host sync to the training loss of that optimizer step's micro-batches
    ("item": `loss.item()`; "bool_index": `labels[labels != -100]`), to show the counter sees them.
    """
    from conftest import habana_double_env, local_ranks_env

    workdir.mkdir(parents=True, exist_ok=True)
    env = {**habana_double_env(), "PT_HPU_LAZY_MODE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(HERE)])
    env.update(local_ranks_env(world_size))
    spec = json.dumps({"out": str(workdir), "inject": inject or {}, "script": str(script)})
    processes = []
    for rank in range(world_size):
        rank_env = {**env, **({"RANK": str(rank), "LOCAL_RANK": str(rank)} if world_size > 1 else {})}
        (workdir / f"rank{rank}.json").unlink(missing_ok=True)
        log = open(workdir / f"rank{rank}.log", "w")
        processes.append((subprocess.Popen([sys.executable, str(Path(__file__).resolve()), spec, *argv], env=rank_env,
                                           cwd=str(workdir), stdout=log, stderr=subprocess.STDOUT), log))
    results = []
    for rank, (process, log) in enumerate(processes):
        process.wait(timeout=timeout)
        log.close()
        out = workdir / f"rank{rank}.json"
        assert out.exists(), (workdir / f"rank{rank}.log").read_text()[-6000:]
        results.append({**json.loads(out.read_text()), "exit_code": process.returncode})
    return results


def run_flags(model: str, dataset: str, output_dir, *extra) -> list:
    """A short lazy-mode Gaudi run through the double: no workers (the collator stays in the process, set apart)."""
    return ["--model_name_or_path", model, "--dataset_name", dataset, "--output_dir", str(output_dir),
            "--use_habana", "--use_lazy_mode", "--report_to", "none", "--seed", "0", "--learning_rate", "1e-3",
            "--dataloader_pin_memory", "False", "--dataloader_num_workers", "0", "--save_strategy", "no",
            "--overwrite_output_dir", *extra]


def varied_image_sizes(dataset_dir: str, output_dir: Path, sizes=((64, 96), (96, 64), (72, 120), (100, 100))) -> str:
    """A copy of a ChartQA-like save_to_disk folder whose images cycle through `sizes` (height, width): data for the
    dynamic-resolution families, whose image shapes follow each image's size."""
    import datasets

    def resize(row, index):
        height, width = sizes[index % len(sizes)]
        return {"image": row["image"].convert("RGB").resize((width, height))}

    data = datasets.load_from_disk(dataset_dir)
    datasets.DatasetDict({name: split.map(resize, with_indices=True) for name, split in data.items()}).save_to_disk(
        str(output_dir))
    return str(output_dir)


def plain_steps(result: dict) -> list:
    """Optimizer steps where the trainer neither logs, saves, evaluates nor stops."""
    return [step for step in result["steps"] if not step["sync_point"]]


# ------------------------------------------------------------------------------------------------
# The subprocess side


def use_mistral_rope_at_positions() -> None:
    """Off an HPU, optimum-habana's Mistral port (LLaVA-NeXT's language model) falls back to rotary embeddings that
    ignore position_ids (optimum/habana/transformers/models/mistral/modeling_mistral.py:707-711) and fail for batches
    of more than one row; its Gemma 3 port's fallback takes the embeddings at the positions, as the HPU's fused RoPE
    does (models/gemma3/modeling_gemma3.py:1125-1130). Measuring runs use that, so that LLaVA-NeXT trains on CPU."""
    from optimum.habana.transformers.models.mistral import modeling_mistral
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    def at_positions(q, k, cos, sin, position_ids, training=True):
        return apply_rotary_pos_emb(q, k, cos[position_ids], sin[position_ids])

    modeling_mistral.apply_customized_rope = at_positions


def _measure(spec: dict, argv: list) -> None:
    import transformers

    import habana_frameworks

    assert habana_frameworks.IS_TEST_DOUBLE
    cost = AtenCost()
    cost.install()
    ledger = Ledger(cost)
    import run_lora_vlm as rlv

    rank = int(os.environ.get("RANK", "0"))
    result = {}
    assert Path(rlv.__file__).resolve() == Path(spec["script"]).resolve(), rlv.__file__
    inject = {int(step): kind for step, kind in spec["inject"].items()}
    loss = rlv.causal_lm_loss

    def injected_loss(outputs, labels, num_items_in_batch=None):
        value = loss(outputs, labels, num_items_in_batch)
        kind = inject.get(result["trainer"].state.global_step + 1) if torch.is_grad_enabled() else None
        if kind == "item":
            value.item()
        elif kind == "bool_index":
            labels[labels != rlv.IGNORE_INDEX].sum()
        return value

    rlv.causal_lm_loss = injected_loss

    class Steps(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            ledger.begin_step(state.global_step + 1, state.epoch or 0.0)

        def on_step_end(self, args, state, control, **kwargs):
            ledger.open_step["sync_point"] = bool(control.should_log or control.should_save or control.should_evaluate
                                                  or control.should_training_stop)

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                cost.optimizers.append(getattr(optimizer, "optimizer", optimizer))

        def on_train_end(self, args, state, control, **kwargs):
            ledger.close_step()

    build_trainer = rlv.build_trainer

    def build_and_watch(model, *args, **kwargs):
        trainer = build_trainer(model, *args, **kwargs)
        trainer.add_callback(Steps())
        training_step, prediction_step = trainer.training_step, trainer.prediction_step

        def watched_training_step(model, inputs, *rest, **kw):
            ledger.begin_batch("train", trainer.state.epoch or 0.0, inputs, trainer.state.global_step + 1)
            try:
                return training_step(model, inputs, *rest, **kw)
            finally:
                ledger.end_batch("train")

        def watched_prediction_step(model, inputs, *rest, **kw):
            ledger.begin_eval_batch(trainer.state.epoch or 0.0, inputs)
            try:
                return prediction_step(model, inputs, *rest, **kw)
            finally:
                ledger.end_batch("eval")

        trainer.training_step, trainer.prediction_step = watched_training_step, watched_prediction_step
        monitor = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, rlv.TrainingLossMonitor))
        finish = monitor.finish_evaluation

        def finish_evaluation():
            ledger.close_eval()
            return finish()

        monitor.finish_evaluation = finish_evaluation
        result["trainer"] = trainer
        return trainer

    rlv.build_trainer = build_and_watch
    use_mistral_rope_at_positions()
    rlv.VisionChatCollator.__call__ = cost.pausing(rlv.VisionChatCollator.__call__)
    # Fetching a batch is host work: the sampler's indices (a CPU generator's randperm), the collator.
    loader_iter = torch.utils.data.dataloader._BaseDataLoaderIter
    loader_iter.__next__ = cost.pausing(loader_iter.__next__)
    # An evaluation batch's window ends with its loop iteration, whose last call is the profiler's step
    # (optimum/habana/transformers/trainer.py:2208); what follows the loop (gathering the losses) is the sync point.
    import optimum.habana.transformers.trainer as gaudi_trainer

    class ClosingProfile(gaudi_trainer.HabanaProfile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            step = self.step

            def step_and_close():
                ledger.close_eval()
                return step()

            self.step = step_and_close

    gaudi_trainer.HabanaProfile = ClosingProfile
    exit_code = 0
    with cost:
        try:
            rlv.main(rlv.parse_args(argv))
        except SystemExit as e:
            exit_code = e.code
    trainer = result.pop("trainer")
    data_args = trainer.data_collator.data_args
    result.update(steps=ledger.steps, batches=ledger.batches, graphs=len(cost.graphs), mark_steps=cost.mark_steps,
                  host_reads=cost.host_reads, length_buckets=data_args.length_buckets,
                  fixed_image_size=getattr(data_args, "fixed_image_size", None))
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(result))
    sys.exit(exit_code)


if __name__ == "__main__":
    measured = json.loads(sys.argv[1])
    sys.path.insert(0, str(Path(measured["script"]).parent))
    _measure(measured, sys.argv[2:])
