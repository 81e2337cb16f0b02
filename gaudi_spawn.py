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

Three back-ends are supported:

* ``--use_mpi``: Open MPI's ``mpirun``; each rank finds its rank / world size
  in ``OMPI_COMM_WORLD_*`` and gets ``MASTER_ADDR`` / ``MASTER_PORT`` exported,
  and runs under this launcher's Python (``sys.executable``);
* ``--use_deepspeed``: the DeepSpeed launcher (``deepspeed``), optionally
  multi-node with ``--hostfile``;
* default: ``torchrun`` (run as ``python -m torch.distributed.run`` so that the
  ranks use the very same interpreter as this launcher).

``--world_size`` is always the *total* number of ranks.  Everything after the
training script path is handed to the script untouched, so the script's own
flags (``--do_train``, ``--output_dir`` ...) are never parsed here.

With ``--use_deepspeed --hostfile`` the number of nodes is the number of hosts
in the hostfile and ``--num_gpus`` (per node) is world_size / nodes; deepspeed
also passes ``--local_rank`` to the script.

Examples (``--dry_run`` prints the command without running it)::

    # 2 CPU ranks through mpirun; each rank writes /tmp/probe/rank<N>.json
    python gaudi_spawn.py --world_size 2 --use_mpi tests/rank_probe.py --out /tmp/probe

    python gaudi_spawn.py --world_size 8 --use_mpi --dry_run \\
        run_lora_vlm.py --model_name_or_path some/model --do_train \\
        --output_dir /tmp/lora-out

This file only needs the Python standard library; it never imports torch,
transformers or optimum.habana itself.
"""

import argparse
import ctypes
import ctypes.util
import importlib.util
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time


logger = logging.getLogger("gaudi_spawn")

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Seconds to wait after forwarding SIGINT/SIGTERM before killing everything.
KILL_GRACE_SECONDS = 20.0
# Exit code for launcher-side errors (bad usage, missing launcher executable).
EXIT_USAGE = 2

INSTALL_HINTS = {
    "mpirun": "install Open MPI, e.g. `apt-get install openmpi-bin`",
    "deepspeed": "install DeepSpeed, e.g. `pip install deepspeed` (on Gaudi: Habana's DeepSpeed fork)",
    "torch": "install PyTorch in this Python environment, e.g. `pip install torch`",
}

# Launcher options: (flags, argparse keyword arguments).  The table is used both
# to build the parser and to find where the training script starts.
_OPTIONS = [
    (("--world_size",), dict(type=int, default=1, help="Total number of ranks (processes) to start (default: 1).")),
    (("--use_mpi",), dict(action="store_true", help="Launch with Open MPI's mpirun.")),
    (("--use_deepspeed",), dict(action="store_true", help="Launch with the DeepSpeed launcher (deepspeed).")),
    (
        ("--hostfile",),
        dict(
            default=None,
            help="Hostfile for multi-node runs (one host per line, e.g. 'node1 slots=8'). "
            "Passed to deepspeed with --use_deepspeed, to mpirun with --use_mpi.",
        ),
    ),
    (
        ("--master_addr",),
        dict(default=DEFAULT_MASTER_ADDR, help=f"Address of rank 0 (default: {DEFAULT_MASTER_ADDR})."),
    ),
    (
        ("--master_port",),
        dict(type=int, default=DEFAULT_MASTER_PORT, help=f"Port of rank 0 (default: {DEFAULT_MASTER_PORT})."),
    ),
    (("--dry_run",), dict(action="store_true", help="Print the command that would be run and exit.")),
]


class LaunchError(Exception):
    """A launcher-side problem reported as a one-line message and exit code 2."""


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #
def build_parser():
    parser = argparse.ArgumentParser(
        prog="gaudi_spawn.py",
        description="Launch a training script on several ranks with mpirun, deepspeed or torchrun.",
        usage="%(prog)s [launcher options] training_script [script arguments ...]",
        allow_abbrev=False,
    )
    for flags, kwargs in _OPTIONS:
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("training_script", help="Path of the training script to launch.")
    parser.add_argument(
        "training_script_args",
        nargs="*",
        default=[],
        help="Arguments for the training script; passed through untouched (never parsed here).",
    )
    return parser


def split_argv(argv):
    """Split argv into (launcher_args, script, script_args).

    The script is the first argument that is neither a launcher option nor the
    value of one; everything after it belongs to the script, verbatim.  A
    literal ``--`` may also mark the end of the launcher options.
    """
    takes_value = {flag for flags, kwargs in _OPTIONS if kwargs.get("action") is None for flag in flags}
    launcher_args = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        launcher_args.append(arg)
        if arg in takes_value and i + 1 < len(argv):
            launcher_args.append(argv[i + 1])
            i += 1
        i += 1
    if i >= len(argv):
        return launcher_args, None, []
    return launcher_args, argv[i], list(argv[i + 1 :])


def parse_args(argv):
    parser = build_parser()
    launcher_args, script, script_args = split_argv(argv)
    # Parse only the launcher part (plus the script path) with argparse so that
    # script flags can never be mistaken for launcher flags.
    args = parser.parse_args(launcher_args + ([script] if script is not None else []))
    args.training_script_args = script_args
    if args.world_size < 1:
        parser.error("--world_size must be >= 1")
    if not 0 < args.master_port < 65536:
        parser.error("--master_port must be in 1..65535")
    if args.use_mpi and args.use_deepspeed:
        parser.error("--use_mpi and --use_deepspeed are mutually exclusive")
    if args.hostfile is not None and not (args.use_mpi or args.use_deepspeed):
        parser.error("--hostfile needs --use_mpi or --use_deepspeed (torchrun is single-node here)")
    return args


# --------------------------------------------------------------------------- #
# Machine inspection (pure parsers + thin readers)
# --------------------------------------------------------------------------- #
def parse_cpuinfo(text, allowed_cpus=None):
    """Return (sockets, cores_per_socket) from /proc/cpuinfo text, or None.

    Physical cores are counted as distinct (physical id, core id) pairs, so
    hyper-threads do not count.  ``allowed_cpus`` (logical CPU ids, e.g. the
    process affinity) restricts the count to the CPUs we may run on.  With
    sockets of different sizes the smallest one is reported.
    """
    cores = {}
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        try:
            cpu = int(fields["processor"])
            socket_id = fields["physical id"]
            core_id = fields["core id"]
        except (KeyError, ValueError):
            continue
        if allowed_cpus is not None and cpu not in allowed_cpus:
            continue
        cores.setdefault(socket_id, set()).add(core_id)
    if not cores:
        return None
    return len(cores), min(len(ids) for ids in cores.values())


def parse_lscpu(text):
    """Return (sockets, cores_per_socket) from `lscpu` output, or None."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    try:
        sockets = int(values["Socket(s)"])
        cores_per_socket = int(values.get("Core(s) per socket") or values["Core(s) per cluster"])
    except (KeyError, ValueError):
        return None
    if sockets < 1 or cores_per_socket < 1:
        return None
    return sockets, cores_per_socket


def detect_cpu_topology():
    """Best effort (sockets, cores_per_socket) of this machine, or None."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            topology = parse_cpuinfo(f.read(), allowed)
        if topology:
            return topology
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["lscpu"],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_lscpu(out)


def parse_hostfile(text):
    """Return the host names of an MPI/DeepSpeed style hostfile, in order.

    Blank lines and ``#`` comments are ignored; the host is the first word of
    each remaining line (``node1 slots=8``).
    """
    hosts = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.append(line.split()[0])
    return hosts


def read_hostfile(path):
    try:
        with open(path, encoding="utf-8") as f:
            hosts = parse_hostfile(f.read())
    except OSError as exc:
        raise LaunchError(f"cannot read hostfile {path!r}: {exc.strerror or exc}") from exc
    if not hosts:
        raise LaunchError(f"hostfile {path!r} lists no hosts")
    return hosts


def is_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- #
# Command builders (pure: same input, same command, whatever the machine)
# --------------------------------------------------------------------------- #
def mpi_binding_args(ranks_per_node, cores_per_socket, sockets):
    """mpirun mapping/binding options for ``ranks_per_node`` ranks per node.

    Ranks are spread round-robin over sockets and each gets K = cores per
    socket // ranks per socket physical cores.  When that is impossible (more
    ranks than cores) or the topology is unknown, binding is switched off and
    oversubscription allowed, so the job still starts.
    """
    if cores_per_socket and sockets and cores_per_socket > 0 and sockets > 0:
        ranks_per_socket = math.ceil(ranks_per_node / sockets)
        cores_per_rank = cores_per_socket // ranks_per_socket
        if cores_per_rank >= 1:
            return ["--bind-to", "core", "--map-by", f"socket:PE={cores_per_rank}"]
    return ["--bind-to", "none", "--map-by", "slot", "--oversubscribe"]


def build_mpi_command(
    world_size,
    script,
    script_args,
    master_addr,
    master_port,
    cores_per_socket,
    sockets,
    is_root,
    hostfile=None,
    num_nodes=1,
    python=None,
):
    """The mpirun command line (a list) for ``world_size`` ranks in total."""
    python = python or sys.executable
    ranks_per_node = math.ceil(world_size / max(1, num_nodes))
    cmd = ["mpirun", "-n", str(world_size)]
    if is_root:
        cmd.append("--allow-run-as-root")
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    cmd += mpi_binding_args(ranks_per_node, cores_per_socket, sockets)
    cmd += ["-x", f"MASTER_ADDR={master_addr}", "-x", f"MASTER_PORT={master_port}"]
    cmd += [python, "-u", str(script), *script_args]
    return cmd


def build_deepspeed_command(world_size, script, script_args, master_addr, master_port, hostfile=None, num_nodes=1):
    """The deepspeed command line; ``--num_gpus`` is per node (world_size / num_nodes)."""
    if num_nodes < 1:
        raise LaunchError("the number of nodes must be >= 1")
    if world_size % num_nodes:
        raise LaunchError(f"--world_size {world_size} is not a multiple of the {num_nodes} nodes in the hostfile")
    cmd = [
        "deepspeed",
        "--num_nodes",
        str(num_nodes),
        "--num_gpus",
        str(world_size // num_nodes),
        "--master_addr",
        str(master_addr),
        "--master_port",
        str(master_port),
    ]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    cmd += [str(script), *script_args]
    return cmd


def build_torchrun_command(world_size, script, script_args, master_addr, master_port, python=None):
    """The torchrun command line, run through ``python -m torch.distributed.run``."""
    python = python or sys.executable
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(world_size),
        "--master_addr",
        str(master_addr),
        "--master_port",
        str(master_port),
        str(script),
        *script_args,
    ]


def build_command(args, topology=None, root=None):
    """Pick the back-end from parsed ``args`` and build its command."""
    num_nodes = len(read_hostfile(args.hostfile)) if args.hostfile is not None else 1
    if args.use_mpi:
        sockets, cores_per_socket = topology or (None, None)
        return build_mpi_command(
            args.world_size,
            args.training_script,
            args.training_script_args,
            args.master_addr,
            args.master_port,
            cores_per_socket,
            sockets,
            root,
            hostfile=args.hostfile,
            num_nodes=num_nodes,
        )
    if args.use_deepspeed:
        return build_deepspeed_command(
            args.world_size,
            args.training_script,
            args.training_script_args,
            args.master_addr,
            args.master_port,
            hostfile=args.hostfile,
            num_nodes=num_nodes,
        )
    return build_torchrun_command(
        args.world_size, args.training_script, args.training_script_args, args.master_addr, args.master_port
    )


# --------------------------------------------------------------------------- #
# Running
# --------------------------------------------------------------------------- #
def check_launcher(cmd, env):
    """Raise LaunchError with an install hint when the launcher is missing."""
    if cmd[0] == sys.executable and cmd[1:3] == ["-m", "torch.distributed.run"]:
        if importlib.util.find_spec("torch") is None:
            raise LaunchError(
                f"torchrun not available: torch is not installed for {sys.executable}; {INSTALL_HINTS['torch']}"
            )
        return
    name = cmd[0]
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found is None:
        hint = INSTALL_HINTS.get(name, "install it or add it to PATH")
        raise LaunchError(f"launcher executable {name!r} not found on PATH; {hint}")
    if name == "deepspeed" and os.path.dirname(os.path.realpath(found)) != os.path.dirname(
        os.path.realpath(sys.executable)
    ):
        logger.warning("using %s, which may run a different Python than %s", found, sys.executable)


def _descendants(pid):
    """PIDs of all live descendants of ``pid`` (Linux /proc walk; [] elsewhere)."""
    children = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc):
    """SIGKILL the child's process group and every process below it.

    mpirun puts each rank in a process group of its own, so killing the group
    alone would leave the ranks behind.
    """
    victims = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _parent_death_signal():
    """preexec_fn asking Linux to SIGTERM the child if this launcher dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec():
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # launcher already gone
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def run_command(cmd, env, grace_seconds=KILL_GRACE_SECONDS):
    """Run ``cmd`` in its own session, forwarding SIGINT/SIGTERM; return an exit code.

    The child gets its own session and process group, so a terminal Ctrl-C
    only reaches this launcher, which forwards it to the child's group (mpirun
    and torchrun pass it on to their ranks).  A second signal, or ranks still
    alive ``grace_seconds`` after the first one, gets everything SIGKILLed.
    """
    procs = []  # the child, once started
    received = []  # (signum, monotonic time) of each signal we got

    def forward(signum, frame):
        received.append((signum, time.monotonic()))
        if not procs:  # not started yet: handled right after Popen
            return
        if len(received) > 1:
            logger.warning("second signal: killing all ranks")
            _kill_tree(procs[0])
            return
        logger.warning("got %s, forwarding it to the ranks", signal.Signals(signum).name)
        try:
            os.killpg(procs[0].pid, signum)
        except OSError:
            pass

    # Install the handlers before starting the child: a signal that this
    # launcher inherited as ignored (e.g. SIGINT in a background job) would
    # otherwise stay ignored in the child too.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_parent_death_signal())
        procs.append(proc)
        if received:  # a signal arrived while starting
            try:
                os.killpg(proc.pid, received[0][0])
            except OSError:
                pass
        while True:
            try:
                returncode = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if len(received) == 1 and time.monotonic() - received[0][1] > grace_seconds:
                logger.warning("ranks still running %.0f s after the signal: killing them", grace_seconds)
                received.append((signal.SIGKILL, time.monotonic()))
                _kill_tree(proc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if returncode < 0:  # the child itself died from a signal
        returncode = 128 - returncode
    if received and returncode == 0:
        returncode = 128 + received[0][0]
    return returncode


def main(argv=None):
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[gaudi_spawn] %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    args = parse_args(sys.argv[1:] if argv is None else list(argv))

    try:
        if not os.path.isfile(args.training_script):
            raise LaunchError(f"training script {args.training_script!r} not found")
        topology = detect_cpu_topology() if args.use_mpi else None
        cmd = build_command(args, topology=topology, root=is_root())
    except LaunchError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE

    if args.dry_run:
        print(shlex.join(cmd))
        return 0

    env = dict(os.environ)
    env["MASTER_ADDR"] = str(args.master_addr)
    env["MASTER_PORT"] = str(args.master_port)
    try:
        check_launcher(cmd, env)
    except LaunchError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE

    backend = "mpirun" if args.use_mpi else "deepspeed" if args.use_deepspeed else "torchrun"
    logger.info("world size %d via %s", args.world_size, backend)
    if args.use_mpi:
        logger.info("cpu topology (sockets, cores per socket): %s", topology or "unknown")
    logger.info("running: %s", shlex.join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        returncode = run_command(cmd, env)
    except FileNotFoundError as exc:
        logger.error("cannot start %r: %s", cmd[0], exc.strerror or exc)
        return EXIT_USAGE
    if returncode != 0:
        logger.error("ranks exited with code %d", returncode)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
