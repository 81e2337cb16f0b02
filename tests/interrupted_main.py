# Licensed under the Apache License, Version 2.0 (the "License").
"""Runs run_lora_vlm.main() and sends this very process a signal right after a given training step.

For the reliability tests: `python tests/interrupted_main.py --at_step 3 --signal KILL <run_lora_vlm flags>`
dies as a preempted or crashed job would, at a known point. With `--slow_rank R`, rank R finishes training last
(as with a slow file system or a callback flushing its writes): it waits until every other rank has finished, then
1 s more. Each rank writes `<output_dir>/rank<N>-finished` when it has finished training and `<output_dir>/rank<N>-exit`
as it exits, each listing the markers present at that moment: the order of events, read without a clock.
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


class SignalAtStep(transformers.TrainerCallback):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def with_signal_at_step(build_trainer, step: int, signum: int):
    """`build_trainer` whose trainers send this process `signum` right after training step `step`."""

    def build_trainer_with_signal(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        # First in line, so the preemption handler sees the signal at this same step end.
        trainer.callback_handler.callbacks.insert(0, SignalAtStep(step, signum))
        return trainer

    return build_trainer_with_signal


def main() -> None:
    argv = sys.argv[1:]
    step = int(argv[argv.index("--at_step") + 1])
    signum = getattr(signal, "SIG" + argv[argv.index("--signal") + 1])
    slow_rank = argv[argv.index("--slow_rank") + 1] if "--slow_rank" in argv else None
    for flag in ("--at_step", "--signal", "--slow_rank"):
        if flag in argv:
            del argv[argv.index(flag): argv.index(flag) + 2]
    if slow_rank is not None:
        rank, train = os.environ.get("OMPI_COMM_WORLD_RANK", "0"), transformers.Trainer.train
        world_size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))
        others = [f"rank{r}-finished" for r in range(world_size) if str(r) != rank]

        def mark(folder: str, name: str) -> None:
            Path(folder, name).write_text("\n".join(sorted(p.name for p in Path(folder).glob("rank*-*"))))

        def marked_train(self, *args, **kwargs):
            result = train(self, *args, **kwargs)
            if rank == slow_rank:
                deadline = time.monotonic() + 600  # only against a hang: the other ranks finish within seconds
                while not all(Path(self.args.output_dir, name).exists() for name in others):
                    assert time.monotonic() < deadline, f"rank {rank}: the other ranks never finished training"
                    time.sleep(0.1)
                time.sleep(1)  # time for a rank that does not wait for this one to exit before it finishes
            mark(self.args.output_dir, f"rank{rank}-finished")
            atexit.register(mark, self.args.output_dir, f"rank{rank}-exit")
            return result

        transformers.Trainer.train = marked_train
    run_lora_vlm.build_trainer = with_signal_at_step(run_lora_vlm.build_trainer, step, signum)
    sys.exit(run_lora_vlm.cli(argv))


if __name__ == "__main__":
    main()
