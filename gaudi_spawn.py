# Copyright 2025 The project authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Launch a training script on several ranks (Gaudi cards, or CPU processes).

Back-ends: ``--use_mpi`` (Open MPI's mpirun), ``--use_deepspeed`` or, by default, torchrun (as
``python -m torch.distributed.run``, so the ranks use this interpreter); their options follow
optimum-habana 1.21.2's runner, optimum/habana/distributed/distributed_runner.py.  After building
the command this process *becomes* the launcher (``os.execvpe``), so exit codes and signals
(Ctrl-C, SIGTERM) reach mpirun, deepspeed or torchrun natively, which pass them on to the ranks.

    PT_HPU_LAZY_MODE=1 python gaudi_spawn.py --world_size 8 --use_mpi run_lora_vlm.py --do_train ...

Standard library only: it never imports torch, transformers or optimum.habana.
"""

import argparse
import importlib.util
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path


DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Variables every rank needs as they are on the launching node: Habana's bridge
# settings (PT_HPU_LAZY_MODE decides lazy or eager mode), Hugging Face caches,
# tokens and offline switches.  mpirun gives remote ranks only what `-x` names.
# HCCL_/GLOO_: the network interfaces of multi-node runs (HCCL for the gradients, gloo for the script's CPU group).
FORWARDED_PREFIXES = ("PT_HPU_", "HABANA_", "HCCL_", "GLOO_", "HF_", "TRANSFORMERS_")
FORWARDED_NAMES = ("TOKENIZERS_PARALLELISM",)
INSTALL_HINTS = {
    "mpirun": "install Open MPI, e.g. `apt-get install openmpi-bin`",
    "deepspeed": "install DeepSpeed, e.g. `pip install deepspeed` (on Gaudi: Habana's DeepSpeed fork)",
    "torchrun": "install PyTorch in this Python environment, e.g. `pip install torch`",
}


class LaunchError(Exception):
    """A launcher-side problem, reported as one line and exit code 2."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="gaudi_spawn.py",
        description="Launch a training script on several ranks with mpirun, deepspeed or torchrun.",
        allow_abbrev=False,
    )
    parser.add_argument("--world_size", type=int, default=1, help="Total number of ranks to start (default: 1).")
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument("--use_mpi", action="store_true", help="Launch with Open MPI's mpirun.")
    backend.add_argument("--use_deepspeed", action="store_true", help="Launch with the DeepSpeed launcher.")
    parser.add_argument(
        "--hostfile",
        help="Hostfile for multi-node runs (one host per line, e.g. 'node1 slots=8'); needs --use_mpi or "
        "--use_deepspeed. The first host becomes the master address.",
    )
    parser.add_argument("--master_addr", help="Address of rank 0 (default: first host of --hostfile, else 127.0.0.1).")
    parser.add_argument("--master_port", type=int, default=DEFAULT_MASTER_PORT, help="Port of rank 0 (default: 29500).")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="With --use_mpi: also pass this environment variable to every rank (mpirun -x); repeatable. "
        f"Always passed: {', '.join(p + '*' for p in FORWARDED_PREFIXES)}, {', '.join(FORWARDED_NAMES)}, "
        "MASTER_ADDR, MASTER_PORT.",
    )
    parser.add_argument("--dry_run", action="store_true", help="Print the exact command that would run, and exit.")
    parser.add_argument("training_script", help="Path of the training script to launch.")
    parser.add_argument(
        "training_script_args", nargs=argparse.REMAINDER, help="Arguments for the training script, passed untouched."
    )
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error("--world_size must be >= 1")
    if not 0 < args.master_port < 65536:
        parser.error("--master_port must be in 1..65535")
    if args.hostfile is not None and not (args.use_mpi or args.use_deepspeed):
        parser.error("--hostfile needs --use_mpi or --use_deepspeed (torchrun runs on one node here)")
    if args.env and not args.use_mpi:
        parser.error("--env needs --use_mpi (mpirun -x); the ranks of torchrun and deepspeed inherit it")
    for entry in args.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(=.*)?", entry, flags=re.DOTALL):
            parser.error(f"--env {entry!r}: expected NAME or NAME=VALUE")
    args.backend = "mpirun" if args.use_mpi else "deepspeed" if args.use_deepspeed else "torchrun"
    return args


def detect_cpu_topology(sysfs_cpus="/sys/devices/system/cpu"):
    """(sockets, physical cores per socket) among the CPUs this process may use, or None.

    Only the CPUs in our affinity count (a container's share); hyper-threads share a core id, so they
    count once; with uneven sockets the smallest one is reported.
    """
    cores = {}
    try:
        for cpu in os.sched_getaffinity(0):
            topology = Path(sysfs_cpus, f"cpu{cpu}", "topology")
            package, core = ((topology / name).read_text().strip() for name in ("physical_package_id", "core_id"))
            cores.setdefault(package, set()).add(core)
    except (OSError, AttributeError):
        return None
    return (len(cores), min(len(ids) for ids in cores.values())) if cores else None


def read_hostfile(path):
    """Host names of an MPI/DeepSpeed hostfile in order; '#' comments and blank lines skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = [line.split("#", 1)[0].split() for line in f]
    except OSError as exc:
        raise LaunchError(f"--hostfile {path!r}: cannot read it ({exc.strerror or exc})") from exc
    hosts = [words[0] for words in entries if words]
    if not hosts:
        raise LaunchError(f"--hostfile {path!r} lists no hosts")
    return hosts


def forwarded_env(environ, user_entries=()):
    """The mpirun ``-x`` entries: matching variables of ``environ`` (sorted), then the user's."""
    user_names = {entry.split("=", 1)[0] for entry in user_entries}
    for entry in user_entries:
        if "=" not in entry and entry not in environ:
            raise LaunchError(f"--env {entry}: {entry} is not set in this environment")
    names = [n for n in sorted(environ) if n.startswith(FORWARDED_PREFIXES) or n in FORWARDED_NAMES]
    return [n for n in names if n not in user_names] + list(user_entries)


def mpi_binding_args(ranks_per_node, topology):
    """mpirun mapping and binding, as optimum-habana's runner does for one node.

    The runner binds each rank to PE cores, maps by socket, ranks by slot (distributed_runner.py:162-166)
    and maps by slot when a socket has one core (a VM, :130-133).  PE here is one socket's cores over the
    ranks sharing it: the runner's all-cores // ranks (:140) when ranks split evenly over the sockets, and
    otherwise still within a socket, where the runner's PE would leave mpirun short of cores.  With unknown
    topology or more ranks than cores, binding is off so that the job still starts.
    """
    if topology:
        sockets, cores_per_socket = topology
        if cores_per_socket == 1:
            unit, cores_per_rank = "slot", sockets // ranks_per_node
        else:
            unit, cores_per_rank = "socket", cores_per_socket // math.ceil(ranks_per_node / sockets)
        if cores_per_rank >= 1:
            return ["--bind-to", "core", "--map-by", f"{unit}:PE={cores_per_rank}", "--rank-by", "slot"]
    return ["--bind-to", "none", "--map-by", "slot", "--oversubscribe", "--rank-by", "slot"]


def build_mpi_command(world_size, script, script_args, master_addr, master_port, topology, exports, hostfile, nodes):
    """mpirun for ``world_size`` ranks on ``nodes`` nodes; ``exports`` are passed with ``-x``."""
    cmd = ["mpirun", "-n", str(world_size), *mpi_binding_args(math.ceil(world_size / nodes), topology)]
    cmd += ["--report-bindings", "--allow-run-as-root"]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    for entry in [f"MASTER_ADDR={master_addr}", f"MASTER_PORT={master_port}", *exports]:
        cmd += ["-x", entry]
    return cmd + [sys.executable, "-u", str(script), *script_args]


def build_deepspeed_command(world_size, script, script_args, master_addr, master_port, hostfile=None, num_nodes=1):
    """deepspeed; ``--num_gpus`` is per node.  ``--no_local_rank`` as in distributed_runner.py:174,194:
    ranks read LOCAL_RANK from the environment instead of a script flag."""
    if world_size % num_nodes:
        raise LaunchError(f"--world_size {world_size} is not a multiple of the {num_nodes} hosts in --hostfile")
    cmd = ["deepspeed", "--num_nodes", str(num_nodes), "--num_gpus", str(world_size // num_nodes), "--no_local_rank"]
    cmd += ["--master_addr", str(master_addr), "--master_port", str(master_port)]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    return cmd + [str(script), *script_args]


def build_torchrun_command(world_size, script, script_args, master_addr, master_port):
    """torchrun, run as ``python -m torch.distributed.run`` with this launcher's interpreter."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size)]
    return cmd + ["--master_addr", str(master_addr), "--master_port", str(master_port), str(script), *script_args]


def build_command(args, environ, topology=None):
    """The launcher command for parsed ``args``; resolves ``args.master_addr`` in place."""
    hosts = read_hostfile(args.hostfile) if args.hostfile is not None else []
    # As optimum-habana's runner: with a hostfile rank 0 runs on its first host (distributed_runner.py:193,254-255).
    args.master_addr = args.master_addr or (hosts[0] if hosts else DEFAULT_MASTER_ADDR)
    common = (args.world_size, args.training_script, args.training_script_args, args.master_addr, args.master_port)
    if args.backend == "mpirun":
        return build_mpi_command(*common, topology, forwarded_env(environ, args.env), args.hostfile, max(1, len(hosts)))
    if args.backend == "deepspeed":
        return build_deepspeed_command(*common, hostfile=args.hostfile, num_nodes=max(1, len(hosts)))
    return build_torchrun_command(*common)


def check_launcher(backend):
    """Raise LaunchError with an install hint when the launcher is missing."""
    if backend == "torchrun":
        if importlib.util.find_spec("torch") is None:
            raise LaunchError(f"torchrun needs torch, not installed for {sys.executable}; {INSTALL_HINTS['torchrun']}")
        return
    found = shutil.which(backend)
    if found is None:
        raise LaunchError(f"launcher executable {backend!r} not found on PATH; {INSTALL_HINTS[backend]}")
    if backend == "deepspeed" and os.path.dirname(found) != os.path.dirname(sys.executable):
        log(f"warning: {found} may run another Python than {sys.executable}")


def log(message):
    print(f"[gaudi_spawn] {message}", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    topology = detect_cpu_topology() if args.use_mpi else None
    try:
        if not os.path.isfile(args.training_script):
            raise LaunchError(f"training script {args.training_script!r} not found")
        cmd = build_command(args, os.environ, topology)
        if not args.dry_run:
            check_launcher(args.backend)
    except LaunchError as exc:
        print(f"gaudi_spawn.py: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    log(f"world size {args.world_size} via {args.backend}")
    if args.use_mpi:
        log(f"cpu topology (sockets, cores per socket): {topology or 'unknown'}")
    log(f"running: {shlex.join(cmd)}")
    sys.stdout.flush()
    env = {**os.environ, "MASTER_ADDR": str(args.master_addr), "MASTER_PORT": str(args.master_port)}
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as exc:
        print(f"gaudi_spawn.py: error: cannot start {cmd[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
