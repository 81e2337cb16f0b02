# Licensed under the Apache License, Version 2.0 (the "License").
"""Runs run_lora_vlm.main() as one rank and records what this rank saw, for the multi-rank tests.

Used as the script given to gaudi_spawn.py: `gaudi_spawn.py --world_size 2 --use_mpi tests/record_rows_main.py
--record_dir DIR <run_lora_vlm flags>`. For each rank it writes DIR/rank<R>.json with the rows its collator
received (split, row index, epoch order), its world size, its training loss log and its eval metrics.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run_lora_vlm  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    record_dir = Path(argv[argv.index("--record_dir") + 1])
    del argv[argv.index("--record_dir"): argv.index("--record_dir") + 2]
    seen = []
    original_call = run_lora_vlm.VisionChatCollator.__call__

    def recording_call(self, features):
        # With --packing each item is a pack, a list of rows.
        rows = [row for item in features for row in (item if isinstance(item, list) else [item])]
        seen.extend([row["split"], row["row_index"]] for row in rows)
        return original_call(self, features)

    run_lora_vlm.VisionChatCollator.__call__ = recording_call
    trainer = run_lora_vlm.main(run_lora_vlm.parse_args(argv))
    record_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "env_rank": os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK")),
        "rows_seen": seen,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "eval": next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None),
        "lora": {k: v.detach().flatten()[:64].tolist() for k, v in trainer.model.state_dict().items() if "lora_" in k},
    }
    (record_dir / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
