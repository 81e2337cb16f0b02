"""Tiny rank script for the gaudi_spawn tests.

Each rank writes ``rank<N>.json`` into ``--out`` with what it sees: its rank,
world size and local rank (Open MPI's ``OMPI_COMM_WORLD_*``, else torchrun's
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), MASTER_ADDR/MASTER_PORT, its pid,
interpreter and argv.  Options:

* ``--allreduce``: also run a torch.distributed gloo all_reduce (env://);
* ``--sleep S``: write ``pid<N>`` and sleep S seconds before finishing;
* ``--fail_rank R``: rank R exits with code 3;
* ``--env_name NAME`` (repeatable): also record the value of environment variable NAME.
Unknown arguments are recorded, not rejected.
"""

import argparse
import json
import os
import sys
import time


def rank_info():
    env = os.environ
    if "OMPI_COMM_WORLD_RANK" in env:
        source = "ompi"
        rank = int(env["OMPI_COMM_WORLD_RANK"])
        world_size = int(env["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
    else:
        source = "torchrun"
        rank = int(env.get("RANK", 0))
        world_size = int(env.get("WORLD_SIZE", 1))
        local_rank = int(env.get("LOCAL_RANK", 0))
    return source, rank, world_size, local_rank


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--allreduce", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--fail_rank", type=int, default=None)
    parser.add_argument("--env_name", action="append", default=[])
    args, extra = parser.parse_known_args()

    source, rank, world_size, local_rank = rank_info()
    os.makedirs(args.out, exist_ok=True)
    record = {
        "source": source,
        "rank": rank,
        "world_size": world_size,
        "local_rank": local_rank,
        "master_addr": os.environ.get("MASTER_ADDR"),
        "master_port": os.environ.get("MASTER_PORT"),
        "pid": os.getpid(),
        "python": sys.executable,
        "argv": sys.argv[1:],
        "extra": extra,
        "env": {name: os.environ.get(name) for name in args.env_name},
    }

    if args.sleep:
        with open(os.path.join(args.out, f"pid{rank}"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(args.sleep)

    if args.fail_rank is not None and rank == args.fail_rank:
        print(f"rank {rank}: failing on purpose", file=sys.stderr)
        return 3

    if args.allreduce:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size)
        tensor = torch.tensor([float(rank + 1)])
        dist.all_reduce(tensor)
        record["allreduce_sum"] = tensor.item()
        dist.destroy_process_group()

    path = os.path.join(args.out, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
