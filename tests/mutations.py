# Licensed under the Apache License, Version 2.0 (the "License").
"""Mutation check: plant one plausible bug at a time in a copy of run_lora_vlm.py and run the tests that should
catch it.

    python tests/mutations.py             # every mutation; a table of caught / survived / broken, with seconds
    python tests/mutations.py --list      # the mutations and the tests each runs
    python tests/mutations.py --only lenient_tolerance_051 [--only ...]

Run by hand and by tests/benchmark.py, not by CI (the file name keeps pytest from collecting it). The repository's
tracked files and its untracked, not ignored ones are copied to a temporary folder; for each mutation the copy's
run_lora_vlm.py is the original with one exact string replaced (it must occur exactly once, else the mutation is
reported broken: the script changed under it), and `python -m pytest -x -q <tests>` runs in the copy with this
process's environment. A mutation is caught when pytest reports failures (exit code 1), survives when the tests pass
(0), and is broken for anything else (no test collected, a usage error, a timeout). Before the mutations, the same
test selections run on the unmutated copy: a selection that fails there would make "caught" meaningless, so the run
stops. Exits non-zero when any mutation survives or is broken.

Add a mutation for every bug fixed from now on.
"""

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "run_lora_vlm.py"
TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    bug: str  # what a user would get
    old: str  # exact text of run_lora_vlm.py, found exactly once
    new: str
    tests: tuple  # pytest arguments: node ids (file::test) or "-k", "expression"


MUTATIONS = [
    Mutation(
        "label_end_eot_untrained",
        "the end-of-turn token is not trained (the span ends where the template's closing tag starts): the model "
        "never learns to stop",
        "spans.append((len(prompt), len(upto)))",
        'spans.append((len(prompt), upto.rindex("<")))',
        ("tests/test_collator.py::test_single_turn_mask_written_by_hand",
         "tests/test_tiny_qwen2_5_vl.py::test_single_turn_mask_written_by_hand",
         "tests/test_tiny_llava_next.py::test_single_turn_mask_written_by_hand"),
    ),
    Mutation(
        "label_end_extra_token",
        "one token after the end of turn (the template's newline) is trained too",
        "tokenize=False)).rstrip()",
        "tokenize=False))",
        ("tests/test_collator.py::test_single_turn_mask_written_by_hand",
         "tests/test_tiny_qwen2_5_vl.py::test_single_turn_mask_written_by_hand",
         "tests/test_tiny_llava_next.py::test_single_turn_mask_written_by_hand",
         "tests/test_model_families.py::test_trained_tokens_are_exactly_the_answers"),
    ),
    Mutation(
        "lenient_tolerance_051",
        "the lenient relaxed accuracy accepts 5.1% instead of 5%",
        "<= 0.05 * abs(gold_number)",
        "<= 0.051 * abs(gold_number)",
        ("tests/test_metrics.py::test_relaxed_match_lenient",),
    ),
    Mutation(
        "lenient_tolerance_strict",
        "the lenient relaxed accuracy rejects an answer exactly 5% off",
        "<= 0.05 * abs(gold_number)",
        "< 0.05 * abs(gold_number)",
        ("tests/test_metrics.py::test_relaxed_match_lenient",),
    ),
    Mutation(
        "relaxed_tolerance_051",
        "the standard relaxed accuracy accepts 5.1% instead of 5%",
        "abs(gold_number) <= 0.05",
        "abs(gold_number) <= 0.051",
        ("tests/test_metrics.py::test_relaxed_match",),
    ),
    Mutation(
        "relaxed_tolerance_strict",
        "the standard relaxed accuracy rejects an answer exactly 5% off (pix2struct's rule is inclusive)",
        "abs(gold_number) <= 0.05",
        "abs(gold_number) < 0.05",
        ("tests/test_metrics.py::test_relaxed_match",),
    ),
    Mutation(
        "loss_ignores_num_items_in_batch",
        "each micro-batch's loss is its own token mean: accumulated batches weigh short answers like long ones and "
        "the accumulated gradient is N times too large",
        "count = trained.sum() if num_items_in_batch is None else num_items_in_batch",
        "count = trained.sum()",
        ("tests/test_collator.py::test_loss_is_the_mean_over_trained_tokens_and_uses_the_window_count",
         "tests/test_loss_scaling.py"),
    ),
    Mutation(
        "loss_divided_by_rows",
        "the loss is divided by the number of rows instead of trained tokens",
        "count = trained.sum() if num_items_in_batch is None else num_items_in_batch",
        "count = labels.shape[0]",
        ("tests/test_collator.py::test_loss_is_the_mean_over_trained_tokens_and_uses_the_window_count",
         "tests/test_loss_scaling.py"),
    ),
    Mutation(
        "sliding_window_off_by_one",
        "Gemma 3's sliding layers on Gaudi see sliding_window + 1 keys (the port's own mistake, undone by the script)",
        "(query_position - key_position) < sliding_window",
        "(query_position - key_position) <= sliding_window",
        ("tests/test_gaudi_gemma3_attention.py::test_masks_equal_the_ones_transformers_gemma3_builds",),
    ),
    Mutation(
        "image_block_dropped",
        "Gemma 3's image tokens on Gaudi attend causally only, not to their whole image",
        "    if token_type_ids is not None:\n        is_image = token_type_ids == 1",
        "    if False:\n        is_image = token_type_ids == 1",
        ("tests/test_gaudi_gemma3_attention.py::test_masks_equal_the_ones_transformers_gemma3_builds",),
    ),
    Mutation(
        "skip_drops_next_row",
        "a row the processor rejects takes the good row after it out of the batch too",
        "if index not in errors]",
        "if index not in errors and index - 1 not in errors]",
        ("tests/test_validation.py::test_every_error_the_processor_raises_for_one_row_names_that_row",
         "tests/test_data_schemas.py::test_a_run_skips_and_reports_bad_rows_and_trains_the_rest"),
    ),
    Mutation(
        "skip_not_recorded",
        "a row the collator skips is dropped silently, missing from skipped_rows.json",
        "                kept.append(feature)\n            except InvalidRowError as e:\n"
        "                self.skipped_rows.reject(feature, e)",
        "                kept.append(feature)\n            except InvalidRowError as e:\n                pass",
        ("tests/test_collator.py::test_skipped_rows_are_recorded_and_an_all_skipped_batch_trains_nothing",),
    ),
    Mutation(
        "prompt_left_in_predictions",
        "generated answers are decoded from position 0: every prediction starts with the prompt",
        'answers = self.encoder.decode(output[:, inputs["input_ids"].shape[1]:])',
        "answers = self.encoder.decode(output[:, 0:])",
        ("tests/test_generation_eval.py::test_every_row_is_answered_once_and_the_learnt_answers_are_the_gold_ones",
         # The one-question mode prints the answer alone, on one line.
         "tests/test_gaudi_path.py::test_one_question_and_merging_need_no_use_habana_where_the_stack_is_installed"),
    ),
    Mutation(
        "wrong_image_fed",
        "the collator hands the model the batch's images rolled by one: every row trains on another row's picture",
        "        inputs = {}\n        for key in self.family.image_inputs:",
        "        inputs, kept = {}, kept[1:] + kept[:1]\n        for key in self.family.image_inputs:",
        ("tests/test_collator.py::test_same_tokens_and_pixels_as_a_bare_processor_call_with_a_single_bos",
         "tests/test_data_schemas.py::test_each_image_lands_at_its_placeholder",
         "tests/test_generation_eval.py::test_every_row_is_answered_once_and_the_learnt_answers_are_the_gold_ones"),
    ),
    Mutation(
        "eval_loss_mean_of_batch_means",
        "eval_loss is the trainer's mean of per-batch means, not the per-token mean over the split",
        'output.metrics[f"{metric_key_prefix}_loss"] = loss',
        "pass",
        ("tests/test_gaudi_cost.py::test_eval_loss_on_cpu_is_the_per_token_mean_and_no_row_is_dropped",),
    ),
    Mutation(
        "kept_logits_off_by_one",
        "logits are kept at the trained tokens instead of the positions before them: the first answer token is "
        "never predicted",
        "needed = torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).flatten()",
        "needed = torch.nonzero((labels[:, :-1] != IGNORE_INDEX).any(dim=0)).flatten()",
        ("tests/test_gaudi_cost.py::test_logits_at_kept_positions_give_todays_loss_and_lora_gradients",),
    ),
    Mutation(
        "preempted_rank_exits_early",
        "after SIGTERM a rank exits without waiting for rank 0's checkpoint (which can end the MPI job mid-save)",
        "        if preemption.stopped_at_step is not None:\n            trainer.accelerator.wait_for_everyone()\n",
        "        if preemption.stopped_at_step is not None:\n            pass\n",
        ("tests/test_multi_rank.py::test_a_preempted_job_ends_only_once_rank_0_has_written_the_checkpoint",),
    ),
    # Bugs fixed in issue 25.
    Mutation(
        "rerun_evaluates_a_fresh_adapter",
        "a finished training asked for more (--do_predict, --merge_adapter) evaluates and merges a fresh LoRA, i.e. "
        "the base model, and overwrites the trained run's metrics with its numbers",
        "model = apply_lora(model, args.lora, family) if trains else with_adapter(model, adapter_for_run(args), "
        "model_args)",
        "model = apply_lora(model, args.lora, family)",
        ("tests/test_daily_use.py::test_a_finished_training_asked_for_more_evaluates_the_trained_adapter",),
    ),
    Mutation(
        "adapter_path_ignored",
        "--adapter_path with --do_eval evaluates the base model (or whatever the output dir holds)",
        "    if args.run.adapter_path:\n        return args.run.adapter_path\n",
        "",
        ("tests/test_daily_use.py::test_adapter_path_with_do_eval_evaluates_that_adapter",),
    ),
    Mutation(
        "help_percent_unescaped",
        "--help crashes on a help text holding a literal %",
        'metadata = {"help": help.replace("%", "%%"),',
        'metadata = {"help": help,',
        ("tests/test_daily_use.py::test_help_lists_every_flag_with_its_help_and_exits_0",),
    ),
    Mutation(
        "data_file_beside_images_read_as_image_folder",
        "a folder with train.jsonl (or data.jsonl) and an images/ subfolder is read as an image folder and refused",
        "        if not data_files:  # an image folder",
        "        if True:  # an image folder",
        ("tests/test_daily_use.py::test_a_data_file_beside_an_images_folder_loads_the_file",),
    ),
    Mutation(
        "paths_not_checked_first",
        "a mistyped path is sent to the Hub (about 30 s of retries online) and ends in the Hub's last line, not the "
        "path",
        "            check_paths(args)\n",
        "",
        ("tests/test_daily_use.py::test_a_wrong_path_is_one_line_naming_it_before_anything_loads",),
    ),
    # Bugs fixed in issues 21 and 22.
    Mutation(
        "projector_ddp_unused_parameters",
        "--train_projector on several ranks stops with DDP's unused-parameter error at the first batch without an image",
        "if (args.lora.train_vision_tower or args.lora.train_projector) and",
        "if args.lora.train_vision_tower and",
        ("tests/test_launcher_signals.py::test_training_the_projector_lets_ddp_find_unused_parameters_unless_the_flag_"
         "says_otherwise",),
    ),
    Mutation(
        "placeholder_mask_syncs_on_hpu",
        "on Gaudi every forward reads a device value back (upstream's image-token count check): a graph break and a "
        "host sync per micro-batch",
        "    ports[0].get_placeholder_mask = static_image_placeholder_mask.__get__(ports[0])\n",
        "",
        ("tests/test_gaudi_gemma3_attention.py::test_image_placeholder_mask_on_gaudi_gives_identical_embeddings_"
         "without_a_sync",),
    ),
    Mutation(
        "hpu_generation_ignores_end_of_turn",
        "on Gaudi, lazy-mode generation runs to --generation_max_new_tokens past the end of turn",
        '"ignore_eos": False}',
        "}",
        ("tests/test_gaudi_gemma3_attention.py::test_generation_on_hpu_equals_upstream_greedy_token_for_token",),
    ),
    # Bugs found by the review of issues 21, 24 and 25.
    Mutation(
        "agreed_stop_counts_as_own_signal",
        "a rank that took the other ranks' stop at a step end exits at once, mid-save, when its own first SIGTERM "
        "arrives a moment later",
        "        if not self.received:",
        "        if not self.signum:",
        ("tests/test_launcher_signals.py::test_a_rank_that_took_the_agreed_stop_is_not_stopped_by_its_own_first_"
         "signal",),
    ),
    Mutation(
        "projector_gets_the_vision_rate",
        "with --train_vision_tower --train_projector --vision_learning_rate, Qwen2.5-VL's projector (inside the "
        "vision tower) trains at the vision rate instead of --learning_rate",
        "    if lora_args.train_projector and rates[family.projector] is None",
        "    if False and rates[family.projector] is None",
        ("tests/test_learning_rates.py::test_a_projector_inside_the_vision_tower_keeps_the_main_rate",),
    ),
    Mutation(
        "data_splits_from_image_names",
        "a data file beside images named like splits (images/train_0.png) belongs to no split and is refused",
        "    patterns = datasets.data_files._get_data_files_patterns(data_only)",
        "    patterns = datasets.data_files.get_data_patterns(str(folder))",
        ("tests/test_daily_use.py::test_a_data_file_beside_an_images_folder_loads_the_file",),
    ),
    Mutation(
        "gaudi_images_not_padded",
        "on Gaudi, batches of one length with different numbers of images and crops have different pixel shapes: a "
        "lazy-mode compile for each",
        "        if present < image_rows:",
        "        if False:",
        ("tests/test_gaudi_library_cost.py::test_gemma3_crops_keep_one_image_shape_per_length_bucket",),
    ),
    Mutation(
        "gaudi_blank_images_first",
        "on Gaudi, the blank images padding a batch come before the real ones: image tokens read blanks",
        'batch["pixel_values"] = blank if pixels is None else torch.cat([pixels, blank])',
        'batch["pixel_values"] = blank if pixels is None else torch.cat([blank, pixels])',
        ("tests/test_gaudi_gemma3_attention.py::test_blank_images_padding_a_batch_on_gaudi_change_nothing",),
    ),
    Mutation(
        "mixed_batch_prompts_right_padded",
        "generation prompts of a batch mixing rows with and without images are right-padded: generation continues "
        "the shorter ones after their padding",
        'if padding_side == "left" else',
        'if padding_side == "never" else',
        ("tests/test_model_families.py::test_a_batch_mixing_rows_with_and_without_images_holds_each_row_as_alone",),
    ),
    Mutation(
        "adapter_crops_dropped_on_rerun",
        "an adapter trained with --pan_and_scan, evaluated by a rerun without the flag, is shown no crops",
        "            check_adapter_crops(args)\n",
        "",
        ("tests/test_pan_and_scan.py::test_an_adapter_trained_with_crops_is_not_evaluated_without_them",),
    ),
    Mutation(
        "one_question_without_reference_attention",
        "on Gaudi, --predict_image answers with optimum-habana's Gemma 3 masks (image tokens attend causally only)",
        "    use_gemma3_reference_attention(model, args.training)  # on Gaudi, the port answers",
        "    (model, args.training)  # on Gaudi, the port answers",
        ("tests/test_generation_eval.py::test_one_question_attends_and_generates_as_evaluation_does",),
    ),
    Mutation(
        "repeated_eval_pack_counted_twice",
        "with --packing on several ranks, a pack accelerate repeats within an evaluation batch counts twice in "
        "eval_loss",
        "per_pack.amax(dim=0)",
        "per_pack.sum(dim=0)",
        ("tests/test_multi_rank.py::test_two_ranks_share_out_packs_and_evaluate_them_as_one_process_unpacked",),
    ),
    Mutation(
        "pack_rows_see_each_other",
        "with --packing an all-ones attention_mask goes with each pack: transformers then reads no row boundaries "
        "from position_ids and every row attends to the rows before it in its pack",
        '        batch["use_cache"] = False\n',
        '        batch["use_cache"] = False\n        batch["attention_mask"] = torch.ones_like(batch["input_ids"])\n',
        ("tests/test_packing.py::test_a_pack_gives_the_loss_and_lora_gradients_of_its_rows_run_alone",),
    ),
    Mutation(
        "pack_labels_cross_rows",
        "with --packing each row's first token is a target of the previous row's last token: a label across a row "
        "boundary, trained on and counted",
        "                labels[0] = IGNORE_INDEX\n",
        "                labels[0] = int(row.input_ids[0])\n",
        ("tests/test_packing.py::test_a_pack_gives_the_loss_and_lora_gradients_of_its_rows_run_alone",),
    ),
    Mutation(
        "pack_positions_run_on",
        "with --packing positions run on through the pack instead of restarting at each row (and the rows, found from "
        "position_ids, are no longer kept apart)",
        "positions[i, start:end] = torch.arange(end - start)",
        "positions[i, start:end] = torch.arange(start, end)",
        ("tests/test_packing.py::test_a_pack_gives_the_loss_and_lora_gradients_of_its_rows_run_alone",),
    ),
    Mutation(
        "gemma3_hpu_pack_rows_see_each_other",
        "with --packing on Gaudi, Gemma 3's reference masks (FusedSDPA) leave out the row boundaries: every row attends "
        "to the rows before it in its pack",
        "        key_present = key_present & (rows.view(batch, 1, length, 1) == rows.view(batch, 1, 1, length))\n",
        "        pass\n",
        ("tests/test_gaudi_gemma3_attention.py::test_a_pack_on_the_port_matches_its_rows_unpacked_upstream",),
    ),
    Mutation(
        "resume_shapes_unchecked",
        "a rerun with another --lora_rank resumes the checkpoint: PEFT fails on the mismatched shapes with a traceback "
        "instead of one line naming the flags",
        "for name in sorted(shapes.keys() & saved_shapes.keys()) if shapes[name] != saved_shapes[name]]",
        "for name in sorted(shapes.keys() & saved_shapes.keys()) if False]",
        ("tests/test_daily_use.py::test_resuming_with_other_trained_weights_is_one_line_and_changes_nothing",),
    ),
    Mutation(
        "packed_dry_run_unpacked",
        "--dry_run_data with --packing checks rows one per sequence, not the packs training will build",
        "items = PackedRows(rows) if args.data.packing else rows",
        "items = rows",
        ("tests/test_packing.py::test_the_dry_run_checks_packs_as_training_builds_them",),
    ),
    Mutation(
        "stop_outside_training_kills",
        "a SIGTERM, or the launcher's stop request, while rows are checked or the model loads kills the ranks by the "
        "signal (the launcher reports a rank killed by signal 10) instead of one line and exit code 143",
        "            self.previous = {signum: signal.signal(signum, self.request)\n"
        "                             for signum in (signal.SIGTERM, LAUNCHER_STOP_SIGNAL)}\n",
        "            self.previous = {}\n",
        ("tests/test_launcher_signals.py::test_sigterm_to_the_launcher_before_training_ends_every_rank_in_one_line",
         "tests/test_launcher_signals.py::test_sigterm_outside_training_is_one_line_and_the_handlers_are_restored"),
    ),
    Mutation(
        "stop_after_the_last_step_ignored",
        "a SIGTERM arriving after the last step's end (during the final checkpoint) is ignored: evaluation and "
        "generation run on past the scheduler's grace period",
        "    if stopped_after_training:\n",
        "    if False:\n",
        ("tests/test_launcher_signals.py::"
         "test_sigterm_after_the_last_step_saves_the_training_and_leaves_evaluation_to_the_rerun",),
    ),
    Mutation(
        "resume_learning_rate_change_silent",
        "a rerun with another --learning_rate resumes at the checkpoint's rates without a word",
        "    if saved and saved != learning_rates:\n",
        "    if False:\n",
        ("tests/test_daily_use.py::test_resuming_with_another_learning_rate_says_the_checkpoint_rates_go_on",),
    ),
    Mutation(
        "stop_raised_in_forked_workers",
        "a process forked outside training (datasets.map's pool, a DataLoader worker) raises the stop as the run does: "
        "each prints a traceback and exits 1 instead of ending as the signal ends it",
        "        if os.getpid() != self.pid:\n",
        "        if False:\n",
        ("tests/test_launcher_signals.py::test_a_stop_ends_forked_workers_quietly_and_an_error_after_it_is_the_stop",),
    ),
    Mutation(
        "error_after_a_stop_is_a_traceback",
        "an error raised while cleaning up after a stop (datasets.map's pool) replaces it: a traceback and exit code 1 "
        "instead of the stop's one line and 143",
        "            if stop.received():\n",
        "            if False:\n",
        ("tests/test_launcher_signals.py::test_a_stop_ends_forked_workers_quietly_and_an_error_after_it_is_the_stop",),
    ),
    Mutation(
        "late_stop_ranks_exit_unsynchronized",
        "after a stop that came after the last step, ranks do not agree on it: a rank whose signal came late goes on "
        "to evaluate while the others exit",
        "            stopped_after_training = bool(preemption.agree())\n",
        "            stopped_after_training = bool(preemption.signum)\n",
        ("tests/test_launcher_signals.py::test_a_stop_after_the_last_step_on_one_rank_stops_both_after_the_saves",),
    ),
    Mutation(
        "dry_run_packs_without_the_model_config",
        "--dry_run_data with --packing fails for Qwen2.5-VL, whose packed positions need the model's config",
        "    collator = VisionChatCollator(encoder, args.data, skipped_rows, model_config=config)\n",
        "    collator = VisionChatCollator(encoder, args.data, skipped_rows)\n",
        ("tests/test_packing.py::test_the_dry_run_packs_qwen2_5_vl_rows",),
    ),
    Mutation(
        "zero3_empty_adapter_refused",
        "resuming a DeepSpeed ZeRO-3 checkpoint, whose adapter file holds no tensors, is refused as if every weight "
        "were new",
        "    if not saved_shapes:  # weights kept elsewhere (ZeRO-3 without gathering), whatever this run's settings\n"
        "        return\n",
        "",
        ("tests/test_daily_use.py::test_a_checkpoint_whose_adapter_file_holds_no_weights_is_resumed_unchecked",),
    ),
]


@dataclasses.dataclass
class Outcome:
    name: str
    result: str  # "caught", "survived", "broken"
    seconds: float
    detail: str = ""


def copy_repository(destination: Path) -> None:
    """The tracked files and the untracked, not ignored ones (as they are in the working tree)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in sorted({name for name in listed if name}):
        source = REPO_ROOT / name
        if not source.is_file():  # a tracked file deleted in the working tree, or a submodule
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def run_tests(copy: Path, tests: tuple) -> tuple[Optional[int], str, float]:
    """(pytest's exit code, the tail of its output, seconds) for `tests` run in `copy`; exit code None on timeout."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        result = subprocess.run(command, cwd=copy, env=dict(os.environ), capture_output=True, text=True,
                                timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, output[-3000:] + f"\n(timed out after {TIMEOUT_S} s)", time.monotonic() - start
    return result.returncode, (result.stdout + result.stderr)[-3000:], time.monotonic() - start


def mutated_source(original: str, mutation: Mutation) -> tuple[str, str]:
    """(the mutated script, "") or ("", why the mutation cannot be applied)."""
    count = original.count(mutation.old)
    if count != 1:
        return "", f"the text to replace occurs {count} times in {SCRIPT}, not once"
    text = original.replace(mutation.old, mutation.new)
    try:
        compile(text, SCRIPT, "exec")
    except SyntaxError as e:
        return "", f"the mutated script does not compile: {e}"
    return text, ""


def check_baseline(copy: Path, mutations: list) -> list:
    """Outcomes of the mutations' test selections that fail on the unmutated script (each must pass): the node ids
    of all of them in one pytest run, each selection with a -k expression in its own."""
    selections = list(dict.fromkeys(m.tests for m in mutations))
    node_ids = tuple(dict.fromkeys(t for tests in selections if "-k" not in tests for t in tests))
    outcomes = []
    for tests in ([node_ids] if node_ids else []) + [tests for tests in selections if "-k" in tests]:
        code, output, seconds = run_tests(copy, tests)
        if code != 0:
            outcomes.append(Outcome("unmutated", f"fails (exit {code})", seconds, f"{' '.join(tests)}\n{output}"))
    return outcomes


def run_mutation(copy: Path, original: str, mutation: Mutation) -> Outcome:
    text, problem = mutated_source(original, mutation)
    if problem:
        return Outcome(mutation.name, "broken", 0.0, problem)
    (copy / SCRIPT).write_text(text)
    try:
        code, output, seconds = run_tests(copy, mutation.tests)
    finally:
        (copy / SCRIPT).write_text(original)
    if code == 1:
        return Outcome(mutation.name, "caught", seconds, output)
    if code == 0:
        return Outcome(mutation.name, "survived", seconds, f"passed: {' '.join(mutation.tests)}")
    return Outcome(mutation.name, "broken", seconds, f"pytest exit code {code}:\n{output}")


def print_table(outcomes: list, verbose: bool = False) -> None:
    width = max([len("mutation")] + [len(o.name) for o in outcomes])
    print(f"{'mutation':<{width}}  {'result':<9}  seconds")
    for outcome in outcomes:
        print(f"{outcome.name:<{width}}  {outcome.result:<9}  {outcome.seconds:7.1f}")
    for outcome in outcomes:
        if (verbose or outcome.result != "caught") and outcome.detail:
            print(f"\n{outcome.name}: {outcome.result}\n{outcome.detail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutation only (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="also show how each caught mutation failed the tests")
    parser.add_argument("--skip_baseline", action="store_true",
                        help="do not first check that the selected tests pass on the unmutated script")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [name for name in args.only or () if name not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; --list shows them")
    selected = [by_name[name] for name in args.only] if args.only else MUTATIONS
    if args.list:
        for m in selected:
            print(f"{m.name}: {m.bug}\n    tests: {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="run-lora-vlm-mutations-") as folder:
        copy = Path(folder)
        copy_repository(copy)
        original = (copy / SCRIPT).read_text()
        if not args.skip_baseline:
            failing = check_baseline(copy, selected)
            if failing:
                print("The mutations' tests must pass on the unmutated script first:")
                print_table(failing)
                return 1
        outcomes = []
        for mutation in selected:
            outcomes.append(run_mutation(copy, original, mutation))
            print(f"{mutation.name}: {outcomes[-1].result} ({outcomes[-1].seconds:.1f} s)", file=sys.stderr, flush=True)
    print_table(outcomes, args.verbose)
    return 0 if all(o.result == "caught" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
