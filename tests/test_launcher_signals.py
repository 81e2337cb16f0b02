# Licensed under the Apache License, Version 2.0 (the "License").
"""Preemption through the real launchers: SIGTERM or Ctrl-C sent to gaudi_spawn.py (as a scheduler or a terminal
does), with two CPU ranks under Open MPI's mpirun or torchrun, and to a run of the script alone.

The ranks run tests/slow_save_main.py: the script itself, made to hold at a chosen step until its stop request
arrives (so the test signals at a known step, ordered by files the ranks write, not by sleeps) and to take seconds
longer to write that step's checkpoint: longer than mpirun waits before it kills ranks it passed SIGTERM on to (about
2 s), and than torchrun waits with TORCH_ELASTIC_SHUTDOWN_TIMEOUT=1.

The data holds rows without an image and the runs train the projector, with DDP's find_unused_parameters left to
the script as GaudiTrainingArguments leaves it (False): a batch without an image must not stop DDP.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import run_lora_vlm as rlv
from conftest import TESTS_DIR, launch_command, needs_mpirun, script_args, train_argv
from interrupted_main import with_signal_at_step
from slow_save_main import with_signal_after_the_last_step
from test_reliability import adapter, assert_same_adapter, logged_losses

HOOKS_MAIN = TESTS_DIR / "slow_save_main.py"
SAVE_SECONDS = "3"  # longer than mpirun (about 2 s) and torchrun (1 s here) wait before they kill


@pytest.fixture(scope="module")
def mixed_rows(tmp_path_factory):
    """12 chat rows as a JSONL file with image files beside it; rows 1, 4, 7 and 10 are text only."""
    import tiny_assets

    folder = tmp_path_factory.mktemp("mixed_rows")
    lines = []
    for i, row in enumerate(tiny_assets.make_chart_rows(12, seed=1)):
        question = [{"type": "text", "text": row["query"]}]
        answer = [{"role": "assistant", "content": [{"type": "text", "text": row["label"][0]}]}]
        if i % 3 == 1:
            lines.append({"images": [], "messages": [{"role": "user", "content": question}, *answer]})
        else:
            row["image"].save(folder / f"chart{i}.png")
            image_part = [{"type": "image", "text": None}]
            lines.append({"images": [f"chart{i}.png"],
                          "messages": [{"role": "user", "content": image_part + question}, *answer]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def six_steps(assets, dataset, output_dir, *extra):
    """Six steps of one row per rank, the projector trained; a checkpoint only when preempted (and at the end)."""
    return train_argv(assets, output_dir, "--do_train", "--max_steps", "6", "--per_device_train_batch_size", "1",
                      "--train_projector", "--save_strategy", "steps", "--save_steps", "100", *extra, dataset=dataset)


def torchrun(command):
    """launch_command's gaudi_spawn.py command with torchrun, the default back-end, in place of --use_mpi."""
    return [arg for arg in command if arg != "--use_mpi"]


def rank_env(events=None, hold=None, seconds=None, hold_before_training=None, late_signal_rank=None,
             final_seconds=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1"}
    hooks = {"SLOW_SAVE_EVENTS": events, "SLOW_SAVE_HOLD_AT_STEP": hold, "SLOW_SAVE_SECONDS": seconds,
             "SLOW_SAVE_HOLD_BEFORE_TRAINING": hold_before_training, "SLOW_SAVE_LATE_SIGNAL_RANK": late_signal_rank,
             "SLOW_SAVE_FINAL_SECONDS": final_seconds}
    env.update({name: str(value) for name, value in hooks.items() if value is not None})
    return env


def wait_for(paths, process, what, timeout=300):
    """Wait until every path exists; fail early if the process ends first (a hang guard, not a timing)."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert process.poll() is None, f"the run ended ({process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


class Run:
    """A command started in the background, its output in files (a full pipe would stall it)."""

    def __init__(self, command, env, log_dir):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / "stdout", log_dir / "stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=err)

    def finish(self, timeout=300):
        self.process.wait(timeout=timeout)
        self.stdout, self.stderr = self.out_path.read_text(), self.err_path.read_text()
        return self.process.returncode

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def checkpoints(output_dir):
    return sorted(p.name for p in output_dir.glob("checkpoint-*"))


@pytest.fixture(scope="module")
def uninterrupted(assets, mixed_rows, tmp_path_factory):
    """The six steps on two mpirun ranks, start to end."""
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "out"
    command = launch_command(2, HOOKS_MAIN, *six_steps(assets, mixed_rows, output_dir))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=rank_env())
    return output_dir, result


def preempted_then_resumed(command, output_dir, tmp_path, uninterrupted, resume=True):
    """SIGTERM to the launcher while both ranks hold at step 2; then (`resume`) the same command again."""
    events = tmp_path / "events"
    run = Run(command, rank_env(events, hold=2, seconds=SAVE_SECONDS), tmp_path / "preempted")
    try:
        wait_for([events / "rank0-step2", events / "rank1-step2"], run.process, "step 2 on both ranks")
        run.process.send_signal(signal.SIGTERM)
        returncode = run.finish()
    finally:
        run.kill()
    assert returncode == 143, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[gaudi_spawn] SIGTERM: every rank finishes its step, saves a checkpoint and stops" in run.stderr
    assert "Preempted (SIGUSR1): stopped after step 2" in run.stderr
    # Both ranks were still writing checkpoint-2 when a back-end's own kill would have struck: it is whole.
    assert {events / "rank0-saving2", events / "rank1-saving2"} <= set(events.iterdir())
    assert checkpoints(output_dir) == ["checkpoint-2"]
    assert rlv.last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-2")
    assert not (output_dir / "adapter_model.safetensors").exists()
    if not resume:
        return
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=rank_env())
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    reference, _ = uninterrupted
    # Steps 1-2 come from checkpoint-2's log history, 3-6 from the resumed run, all equal to the uninterrupted run's.
    losses, expected = logged_losses(output_dir), logged_losses(reference)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert [losses[s] for s in range(1, 7)] == pytest.approx([expected[s] for s in range(1, 7)], rel=1e-5)
    assert_same_adapter(adapter(output_dir), adapter(reference))


@needs_mpirun
def test_two_ranks_train_the_projector_on_batches_without_an_image(assets, uninterrupted):
    """Rows 1, 4, 7 and 10 have no image, and the first five steps take 10 of the 12 rows: in one of them at least, a
    rank's batch has no image and its backward leaves the projector without gradients, which DDP refuses at the next
    step unless it looks for unused parameters (settled by the script). The projector is still trained, by the
    batches that have images."""
    output_dir, result = uninterrupted
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(logged_losses(output_dir)) == [1, 2, 3, 4, 5, 6]
    trained = {name: value for name, value in adapter(output_dir).items() if "multi_modal_projector" in name}
    base = load_file(os.path.join(assets["model"], "model.safetensors"))
    assert trained, "the projector is not saved with the adapter"
    for name, value in trained.items():
        base_name = next(b for b in base if b.endswith(name.split("multi_modal_projector.", 1)[1]) and
                         "multi_modal_projector" in b)
        assert not torch.equal(value, base[base_name]), name


def test_training_the_projector_lets_ddp_find_unused_parameters_unless_the_flag_says_otherwise():
    assert script_args("--train_projector").training.ddp_find_unused_parameters is True
    given = script_args("--train_projector", "--ddp_find_unused_parameters", "false")
    assert given.training.ddp_find_unused_parameters is False


@needs_mpirun
def test_sigterm_to_the_mpirun_launcher_saves_one_checkpoint_and_the_rerun_resumes(assets, mixed_rows, uninterrupted,
                                                                                  tmp_path):
    output_dir = tmp_path / "out"
    command = launch_command(2, HOOKS_MAIN, *six_steps(assets, mixed_rows, output_dir))
    preempted_then_resumed(command, output_dir, tmp_path, uninterrupted)


@needs_mpirun
def test_sigterm_to_the_torchrun_launcher_saves_one_complete_checkpoint(assets, mixed_rows, uninterrupted, tmp_path):
    output_dir = tmp_path / "out"
    command = torchrun(launch_command(2, HOOKS_MAIN, *six_steps(assets, mixed_rows, output_dir)))
    # The checkpoint is the same whichever launcher stopped the ranks: the mpirun test resumes from it.
    preempted_then_resumed(command, output_dir, tmp_path, uninterrupted, resume=False)


@needs_mpirun
def test_a_second_ctrl_c_to_the_launcher_stops_at_once_and_keeps_the_last_complete_checkpoint(assets, mixed_rows,
                                                                                              tmp_path):
    """Checkpoint-2 is saved on schedule; Ctrl-C at step 3, and again while checkpoint-3 is being written (which
    would take a minute): everything stops at once, checkpoint-3 is left without its trainer_state.json."""
    output_dir, events = tmp_path / "out", tmp_path / "events"
    command = launch_command(2, HOOKS_MAIN, *six_steps(assets, mixed_rows, output_dir, "--save_steps", "2"))
    run = Run(command, rank_env(events, hold=3, seconds=60), tmp_path / "log")
    try:
        wait_for([events / "rank0-step3", events / "rank1-step3"], run.process, "step 3 on both ranks")
        run.process.send_signal(signal.SIGINT)
        wait_for([events / "rank0-saving3"], run.process, "the save of checkpoint-3")
        second = time.monotonic()
        run.process.send_signal(signal.SIGINT)
        returncode = run.finish()
        stopped_after = time.monotonic() - second
    finally:
        run.kill()
    assert returncode == 130, run.stdout[-3000:] + run.stderr[-3000:]
    assert stopped_after < 30  # the save alone would have taken 60 s
    # One line says so, the launcher's: the ranks it asked to stop leave without a word.
    assert [line for line in run.stderr.splitlines() if "SIGINT again:" in line] == [
        "[gaudi_spawn] SIGINT again: stopping every rank now; a checkpoint still being written is dropped (resuming "
        "picks the last complete one)"]
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    assert checkpoints(output_dir) == ["checkpoint-2", "checkpoint-3"]
    assert not (output_dir / "checkpoint-3" / "trainer_state.json").exists()
    assert rlv.last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-2")


# --------------------------------------------------------------------------------------------------------------------
# The script alone: Ctrl-C is SIGINT to the process itself
# --------------------------------------------------------------------------------------------------------------------


@needs_mpirun
def test_sigterm_to_the_launcher_before_training_ends_every_rank_in_one_line(assets, mixed_rows, tmp_path):
    """The launcher's stop request reaching ranks that have not begun training (loading the model here): nothing to
    save, so each rank ends at once with one line and exit code 143, not killed by the request's signal."""
    output_dir, events = tmp_path / "out", tmp_path / "events"
    command = launch_command(2, HOOKS_MAIN, *six_steps(assets, mixed_rows, output_dir))
    run = Run(command, rank_env(events, hold_before_training=1), tmp_path / "log")
    try:
        wait_for([events / "rank0-loading", events / "rank1-loading"], run.process, "both ranks loading the model")
        run.process.send_signal(signal.SIGTERM)
        returncode = run.finish(timeout=60)  # the hold alone would take 300 s
    finally:
        run.kill()
    assert returncode == 143, run.stdout[-3000:] + run.stderr[-3000:]
    stopped = ("error: stopped (SIGUSR1) outside training: no step to finish, nothing to save. Run the same command "
               "again to go on.")
    assert run.stderr.count(stopped) == 2, run.stderr[-3000:]  # mpirun may put both ranks' lines on one
    assert "Traceback" not in run.stderr and "exited on signal" not in run.stderr, run.stderr[-3000:]
    assert checkpoints(output_dir) == []


@needs_mpirun
def test_a_stop_after_the_last_step_on_one_rank_stops_both_after_the_saves(assets, mixed_rows, tmp_path):
    """Rank 1 alone gets SIGTERM after the last step's stop check; rank 0 takes a second longer to save the trainer
    state. Both ranks agree on the stop once the training is saved: neither goes on, and rank 1 does not end the job
    while rank 0 still writes."""
    output_dir, events = tmp_path / "out", tmp_path / "events"
    command = launch_command(2, HOOKS_MAIN, *six_steps(assets, mixed_rows, output_dir, "--max_steps", "2"))
    run = Run(command, rank_env(events, late_signal_rank=1, final_seconds=1), tmp_path / "log")
    try:
        returncode = run.finish(timeout=300)
    finally:
        run.kill()
    assert returncode == 143, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stderr.count("Preempted (SIGTERM) after the last step: the adapter and training results are saved") \
        == 2, run.stderr[-3000:]
    assert "rank0-state-saved" in (events / "rank1-exit").read_text().split()  # rank 1 waited for rank 0's save
    assert (output_dir / "trainer_state.json").is_file() and (output_dir / "train_results.json").is_file()
    assert (output_dir / "adapter_model.safetensors").is_file() and not (output_dir / rlv.RUN_FLAGS_FILE).exists()


def test_sigterm_outside_training_is_one_line_and_the_handlers_are_restored(assets, tmp_path, monkeypatch, capsys):
    validate_rows = rlv.validate_rows

    def validate_rows_then_sigterm(*args, **kwargs):
        splits = validate_rows(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return splits

    monkeypatch.setattr(rlv, "validate_rows", validate_rows_then_sigterm)
    monkeypatch.setattr(rlv, "load_model", lambda *a, **k: pytest.fail("went on to load the model"))
    unhandled = lambda signum, frame: pytest.fail("SIGTERM reached no handler of the script")  # noqa: E731
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert rlv.cli(train_argv(assets, tmp_path, "--do_train", "--max_steps", "2")) == 143
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the script's handler is gone with the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: stopped (SIGTERM) outside training: no step to finish, nothing to save. Run the same command again "
        "to go on.")


def sleep_once_started(started):
    started.set()
    time.sleep(60)


def test_a_stop_ends_forked_workers_quietly_and_an_error_after_it_is_the_stop(assets, tmp_path, monkeypatch, capsys):
    """A process forked outside training (as datasets.map's pool and DataLoader workers are) ends as the signal ends
    it, without raising the run's stop; and an error raised while cleaning up after the stop (datasets.map's pool
    raises a TimeoutError) still ends the run as the stop: one line, 143."""
    import multiprocessing

    validate_rows, exit_codes, fork = rlv.validate_rows, [], multiprocessing.get_context("fork")

    def validate_rows_with_a_worker_then_a_stop(*args, **kwargs):
        started = fork.Event()
        worker = fork.Process(target=sleep_once_started, args=(started,))
        worker.start()
        # Signalled once running: Python drops a signal that reaches a child before it is set up after the fork.
        assert started.wait(timeout=30)
        os.kill(worker.pid, signal.SIGTERM)
        worker.join(timeout=30)
        exit_codes.append(worker.exitcode)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the stop is raised here
        finally:
            raise TimeoutError("the pool's results, no longer waited for")

    monkeypatch.setattr(rlv, "validate_rows", validate_rows_with_a_worker_then_a_stop)
    assert rlv.cli(train_argv(assets, tmp_path, "--do_train", "--max_steps", "2")) == 143
    assert exit_codes == [-signal.SIGTERM]
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: stopped (SIGTERM) outside training") and "Traceback" not in err


def test_sigterm_after_the_last_step_saves_the_training_and_leaves_evaluation_to_the_rerun(assets, tmp_path,
                                                                                           monkeypatch, caplog):
    argv = train_argv(assets, tmp_path, "--do_train", "--do_eval", "--max_steps", "2", "--per_device_train_batch_size",
                      "2", "--max_train_samples", "4", "--max_eval_samples", "2", "--save_strategy", "steps",
                      "--save_steps", "100")
    monkeypatch.setattr(rlv, "build_trainer", with_signal_after_the_last_step(rlv.build_trainer))
    with caplog.at_level("ERROR"), pytest.raises(SystemExit) as exited:
        rlv.cli(argv)
    assert exited.value.code == 143
    assert f"Preempted (SIGTERM) after the last step: the adapter and training results are saved in {tmp_path}" \
        in caplog.text
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "train_results.json").is_file()
    assert not (tmp_path / "eval_results.json").exists()
    adapter_before = (tmp_path / "adapter_model.safetensors").read_bytes()
    monkeypatch.undo()
    # The rerun finds the training finished: it evaluates the saved adapter and trains nothing.
    assert rlv.cli(argv) == 0
    assert (tmp_path / "eval_results.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == adapter_before
    assert checkpoints(tmp_path) == ["checkpoint-2"]


def test_ctrl_c_finishes_the_step_saves_and_exits_130(assets, tmp_path, monkeypatch, caplog):
    argv = train_argv(assets, tmp_path, "--do_train", "--max_steps", "6", "--per_device_train_batch_size", "2",
                      "--max_train_samples", "12", "--save_strategy", "steps", "--save_steps", "100")
    monkeypatch.setattr(rlv, "build_trainer", with_signal_at_step(rlv.build_trainer, 3, signal.SIGINT))
    # Should the script not handle SIGINT, this fails the test instead of interrupting pytest.
    unhandled = lambda signum, frame: pytest.fail("SIGINT reached no handler of the script")  # noqa: E731
    previous = signal.signal(signal.SIGINT, unhandled)
    try:
        with caplog.at_level("ERROR"), pytest.raises(SystemExit) as exited:
            rlv.main(rlv.parse_args(argv))
        assert signal.getsignal(signal.SIGINT) is unhandled  # the script's handler is gone with the run
    finally:
        signal.signal(signal.SIGINT, previous)
    assert exited.value.code == 130
    assert "Preempted (SIGINT): stopped after step 3" in caplog.text
    assert checkpoints(tmp_path) == ["checkpoint-3"]
    assert rlv.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")


def test_a_second_ctrl_c_stops_a_lone_run_at_once_in_one_line(assets, mixed_rows, tmp_path):
    output_dir, events = tmp_path / "out", tmp_path / "events"
    command = [sys.executable, str(HOOKS_MAIN), *six_steps(assets, mixed_rows, output_dir)]
    run = Run(command, rank_env(events, hold=2, seconds=60), tmp_path / "log")
    try:
        wait_for([events / "rank0-step2"], run.process, "step 2")
        run.process.send_signal(signal.SIGINT)
        wait_for([events / "rank0-saving2"], run.process, "the save of checkpoint-2")
        run.process.send_signal(signal.SIGINT)
        returncode = run.finish(timeout=30)  # the save alone would take 60 s
    finally:
        run.kill()
    assert returncode == 130, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    assert "SIGINT: finishing this step, then saving a checkpoint and stopping; SIGINT again stops at once." in lines
    assert lines[-1] == ("SIGINT again: stopped at once, before the checkpoint was complete; resuming picks the last "
                         "complete one.")
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    assert checkpoints(output_dir) == ["checkpoint-2"]
    assert rlv.last_complete_checkpoint(output_dir) is None


def test_a_rank_that_took_the_agreed_stop_is_not_stopped_by_its_own_first_signal(monkeypatch):
    # A scheduler signals nodes a moment apart: a rank may take the others' stop at a step end before its own SIGTERM
    # arrives. That SIGTERM is its first, not a second one: the checkpoint save must go on.
    exits = []
    monkeypatch.setattr(rlv.os, "_exit", exits.append)
    handler = rlv.PreemptionHandler()
    handler.signum = signal.SIGUSR1  # what on_step_end takes from the ranks' agreement
    handler.request(signal.SIGTERM, None)
    assert exits == [] and handler.exit_code == 143
    handler.request(signal.SIGTERM, None)  # a second one of its own does stop it at once
    assert exits == [128 + signal.SIGTERM]
