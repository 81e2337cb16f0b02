# Licensed under the Apache License, Version 2.0 (the "License").
"""Runs run_lora_vlm.cli() (one rank of a launcher, or alone) with test-only hooks, for the preemption tests.

The hooks are read from the environment, so that re-running the very same command line is what a user does:

- `SLOW_SAVE_EVENTS=DIR`: each rank writes `DIR/rank<R>-step<N>` when it holds at step N and `DIR/rank<R>-saving<N>`
  once checkpoint N is partly written (model weights, not yet the optimizer nor trainer_state.json).
- `SLOW_SAVE_HOLD_AT_STEP=N`: at the end of step N each rank waits for its stop request (a signal) before the
  preemption handler looks for one, so the run stops at step N whatever the timing.
- `SLOW_SAVE_SECONDS=S`: writing the checkpoint of step N takes S seconds longer, in the middle of the save.
- `SLOW_SAVE_LATE_SIGNAL_RANK=R`: rank R sends itself SIGTERM at the end of the last step, once the preemption
  handler has looked for a stop request there; `SLOW_SAVE_FINAL_SECONDS=S`: rank 0's final save of the trainer state
  (after training) takes S seconds longer, then rank 0 writes `DIR/rank0-state-saved`; as each rank exits it writes
  `DIR/rank<R>-exit`, listing the events present at that moment (their order, read without a clock).
- `SLOW_SAVE_HOLD_BEFORE_TRAINING=1`: each rank writes `DIR/rank<R>-loading` as it starts loading the model (the rows
  checked, no training begun) and waits there (up to 300 s) for a signal to end it.

It also gives `--ddp_find_unused_parameters` the default GaudiTrainingArguments gives it, False
(optimum/habana/transformers/training_args.py:353-356), where the stock TrainingArguments has None: the CPU ranks
then meet DDP as Gaudi ranks do.
"""

import atexit
import os
import signal
import sys
import time
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run_lora_vlm  # noqa: E402

RANK = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0"))


def mark(name: str) -> None:
    events = os.environ.get("SLOW_SAVE_EVENTS")
    if events:
        Path(events).mkdir(parents=True, exist_ok=True)
        Path(events, f"rank{RANK}-{name}").write_text("")


class HoldUntilStopRequested(transformers.TrainerCallback):
    def __init__(self, step: int, preemption: run_lora_vlm.PreemptionHandler):
        self.step, self.preemption = step, preemption

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            mark(f"step{self.step}")
            deadline = time.monotonic() + 300  # only against a hang: the test signals as soon as it sees the mark
            while not self.preemption.signum:
                assert time.monotonic() < deadline, f"rank {RANK}: no stop request at step {self.step}"
                time.sleep(0.05)


class SignalAfterTheLastStepEnds(transformers.TrainerCallback):
    """Last in line: the preemption handler has looked for a stop request at this step end already."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            os.kill(os.getpid(), signal.SIGTERM)


def with_signal_after_the_last_step(build_trainer):
    """`build_trainer` whose trainers send this process SIGTERM at the end of the last step, after the preemption
    handler's look."""

    def build_trainer_with_late_signal(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(SignalAfterTheLastStepEnds())
        return trainer

    return build_trainer_with_late_signal


def main() -> None:
    hold_step = int(os.environ.get("SLOW_SAVE_HOLD_AT_STEP", "0"))
    seconds = float(os.environ.get("SLOW_SAVE_SECONDS", "0"))
    field = transformers.TrainingArguments.__dataclass_fields__["ddp_find_unused_parameters"]
    field.default = False
    build_trainer, save_optimizer = run_lora_vlm.build_trainer, transformers.Trainer._save_optimizer_and_scheduler

    def build_trainer_with_hold(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        preemption = next(cb for cb in trainer.callback_handler.callbacks
                          if isinstance(cb, run_lora_vlm.PreemptionHandler))
        # First in line, so the preemption handler sees the request at this same step end.
        trainer.callback_handler.callbacks.insert(0, HoldUntilStopRequested(hold_step, preemption))
        return trainer

    def slow_save_optimizer(self, output_dir):
        # Trainer._save_checkpoint writes the model, then this, then trainer_state.json (transformers/trainer.py).
        mark(f"saving{self.state.global_step}")
        if self.state.global_step == hold_step:
            time.sleep(seconds)
        return save_optimizer(self, output_dir)

    load_model = run_lora_vlm.load_model

    def load_model_after_a_hold(*args, **kwargs):
        mark("loading")
        time.sleep(300)  # only against a hang: the test signals as soon as it sees the mark
        return load_model(*args, **kwargs)

    save_state = transformers.Trainer.save_state

    def slow_save_state(self):
        if RANK != "0":
            return save_state(self)
        time.sleep(float(os.environ["SLOW_SAVE_FINAL_SECONDS"]))
        saved = save_state(self)
        mark("state-saved")
        return saved

    def mark_exit():
        events = os.environ.get("SLOW_SAVE_EVENTS")
        if events:
            Path(events).mkdir(parents=True, exist_ok=True)
            Path(events, f"rank{RANK}-exit").write_text("\n".join(sorted(p.name for p in Path(events).iterdir())))

    if hold_step:
        run_lora_vlm.build_trainer = build_trainer_with_hold
    if os.environ.get("SLOW_SAVE_LATE_SIGNAL_RANK") == RANK:
        run_lora_vlm.build_trainer = with_signal_after_the_last_step(build_trainer)
    if os.environ.get("SLOW_SAVE_FINAL_SECONDS"):
        transformers.Trainer.save_state = slow_save_state
        atexit.register(mark_exit)
    if os.environ.get("SLOW_SAVE_HOLD_BEFORE_TRAINING"):
        run_lora_vlm.load_model = load_model_after_a_hold
    transformers.Trainer._save_optimizer_and_scheduler = slow_save_optimizer
    sys.exit(run_lora_vlm.cli(sys.argv[1:]))


if __name__ == "__main__":
    main()
