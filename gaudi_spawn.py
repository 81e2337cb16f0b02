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
optimum-habana 1.21.2's runner, optimum/habana/distributed/distributed_runner.py.

This process stays the parent of the back-end (in a session of its own) and takes the signals meant for
the job.  The first SIGTERM or SIGINT (Ctrl-C) becomes a stop request, SIGUSR1, to the ranks: mpirun
passes SIGUSR1 on to every rank on every node without killing any; for torchrun and deepspeed on one
node it goes to the ranks, this process's descendants; for deepspeed on several hosts, through pdsh to
the ranks on every host (pkill).  run_lora_vlm.py's ranks then agree on a step, finish it, save a
checkpoint and exit; none of the back-ends starts its kill timer (mpirun's 2 s, torchrun's 30 s), so the
save takes as long as it needs.  The launcher then exits 143 (SIGTERM) or 130 (SIGINT).  A second
SIGTERM or SIGINT goes to the back-end and the ranks as it is: everything stops at once.

    PT_HPU_LAZY_MODE=1 python gaudi_spawn.py --world_size 8 --use_mpi run_lora_vlm.py --do_train ...

Standard library only: it never imports torch, transformers or optimum.habana.
"""

import argparse
import hashlib
import importlib.util
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
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


# The stop request run_lora_vlm.py's ranks take as "finish the step, save a checkpoint and stop" (its
# LAUNCHER_STOP_SIGNAL).  Open MPI's mpirun passes SIGUSR1 on to every rank and does nothing else; on SIGTERM or SIGINT
# it kills the ranks a second or two later (odls_base_sigkill_timeout), and torchrun 30 s later
# (torch/distributed/elastic/multiprocessing/api.py, close()), whatever a checkpoint save still needs.
STOP_SIGNAL = signal.SIGUSR1
JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# DeepSpeed's multi-node runner gives remote ranks only a few variables of its own choosing plus the lines of its
# environment file: `.deepspeed_env` in the home and the working directory, or the name DS_ENV_FILE gives
# (deepspeed/launcher/runner.py, DEEPSPEED_ENVIRONMENT_NAME and DEEPSPEED_ENVIRONMENT_PATHS).
DEEPSPEED_ENV_FILE = ".deepspeed_env"


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
        parser.error("--env needs --use_mpi (mpirun -x); the ranks of torchrun and deepspeed inherit the "
                     "environment, and deepspeed's on other hosts also get the lines of your .deepspeed_env")
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


def deepspeed_env_lines(environ, home, cwd):
    """The environment file for DeepSpeed's multi-node runner: the lines of the files it would read itself, verbatim
    and in its order (the user's, never dropped or changed), then NAME=VALUE for each variable mpirun would forward
    (see `forwarded_env`) that they leave unset.  Values are shell-quoted: the pdsh runner pastes them into
    `export NAME=VALUE;` (deepspeed/launcher/multinode_runner.py, PDSHRunner.get_cmd)."""
    name = environ.get("DS_ENV_FILE", DEEPSPEED_ENV_FILE)
    lines, seen = [], set()
    for folder in (home, cwd):
        path = os.path.join(folder, name)  # an absolute DS_ENV_FILE names the same file twice, as for DeepSpeed
        if os.path.isfile(path) and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            try:
                with open(path, encoding="utf-8") as f:
                    lines += f.read().splitlines()
            except OSError as exc:
                raise LaunchError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    user_names = {line.split("=", 1)[0].strip() for line in lines if "=" in line}
    for variable in forwarded_env(environ):
        if variable not in user_names:
            value = environ[variable]
            if "\n" in value:
                raise LaunchError(f"{variable} holds a line break, which DeepSpeed's environment file cannot carry")
            lines.append(f"{variable}={shlex.quote(value)}")
    return lines


def write_deepspeed_env(lines):
    """Write the environment file for DS_ENV_FILE and return its path.  It is named after its content, in a folder of
    this user's under the temporary directory, so that a dry run prints the very command a real launch runs."""
    text = "".join(line + "\n" for line in lines)
    folder = Path(tempfile.gettempdir(), f"gaudi_spawn-{os.getuid()}")
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise LaunchError(f"{folder} belongs to another user; set TMPDIR to a folder of yours")
    path = folder / f"deepspeed_env-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    partial = folder / f"{path.name}.{os.getpid()}.partial"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


def build_torchrun_command(world_size, script, script_args, master_addr, master_port):
    """torchrun, run as ``python -m torch.distributed.run`` with this launcher's interpreter."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size)]
    return cmd + ["--master_addr", str(master_addr), "--master_port", str(master_port), str(script), *script_args]


def build_command(args, environ, topology=None):
    """(launcher command, variables to add to its environment) for parsed ``args``; resolves ``args.master_addr`` in
    place.  For DeepSpeed on several hosts the variables name the environment file the remote ranks get (written)."""
    hosts = read_hostfile(args.hostfile) if args.hostfile is not None else []
    # As optimum-habana's runner: with a hostfile rank 0 runs on its first host (distributed_runner.py:193,254-255).
    args.master_addr = args.master_addr or (hosts[0] if hosts else DEFAULT_MASTER_ADDR)
    common = (args.world_size, args.training_script, args.training_script_args, args.master_addr, args.master_port)
    if args.backend == "mpirun":
        cmd = build_mpi_command(*common, topology, forwarded_env(environ, args.env), args.hostfile, max(1, len(hosts)))
        return cmd, {}
    if args.backend == "deepspeed":
        cmd = build_deepspeed_command(*common, hostfile=args.hostfile, num_nodes=max(1, len(hosts)))
        if len(hosts) < 2:
            return cmd, {}  # on one node DeepSpeed starts every rank here, with this environment
        lines = deepspeed_env_lines(environ, os.path.expanduser("~"), os.getcwd())
        return cmd, {"DS_ENV_FILE": str(write_deepspeed_env(lines))}
    return build_torchrun_command(*common), {}


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


def log(message, own_line=False):
    """One line to stderr; `own_line`: start it on a line of its own, as the ranks' progress bars end in no newline."""
    print(f"{chr(10) if own_line else ''}[gaudi_spawn] {message}", file=sys.stderr, flush=True)


def runs_script(argv, script):
    """Whether `argv` is an interpreter running `script` (`python [-u ...] script ...`), not a launcher that names it
    among its own arguments (`python -m torch.distributed.run ... script`, `mpirun -n 2 python script`)."""
    if script not in argv[1:]:
        return False
    return all(arg.startswith("-") and arg not in ("-m", "-c") for arg in argv[1:argv.index(script, 1)])


def rank_processes(root_pid, script, proc_dir="/proc"):
    """Pids of the processes below `root_pid` that run `script`: the ranks the back-end started on this node.  Not
    their own children: a rank's data loader workers are forks with the same command line."""
    children = {}
    for entry in os.scandir(proc_dir):
        if entry.name.isdigit():
            try:
                with open(os.path.join(entry.path, "stat")) as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    ranks, todo = [], [root_pid]
    while todo:
        for pid in children.get(todo.pop(), []):
            try:
                with open(os.path.join(proc_dir, str(pid), "cmdline"), "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            (ranks if runs_script(argv, script) else todo).append(pid)
    return sorted(ranks)


def send(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it has just exited


def rank_pattern(script):
    """The pattern `pkill -f` matches a rank's command line with, as DeepSpeed's per-node launcher starts each rank:
    `python -u SCRIPT ...` (deepspeed/launcher/launch.py, the `cmd` of each local rank); the launcher's own command
    line names SCRIPT too, but not after `-u`, and so does the shell running pkill, but escaped."""
    return "-u " + re.escape(script) + "( |$)"


def remote_stop_command(hosts, script):
    """The stop request for DeepSpeed on several hosts, whose runner starts every rank over pdsh and ssh, none of
    them a process of this launcher: SIGUSR1 to the ranks on every host, through pdsh as DeepSpeed's own runner kills
    them (deepspeed/launcher/multinode_runner.py, PDSHRunner)."""
    # "--": the pattern starts with "-u", which pkill would otherwise read as its own option.
    return ["pdsh", "-S", "-w", ",".join(hosts), f"pkill -{STOP_SIGNAL.name.removeprefix('SIG')} -f -- "
            + shlex.quote(rank_pattern(script))]


def request_stop(backend, proc, script, hosts=()):
    """Ask every rank to finish its step, save a checkpoint and stop; False when no rank could be asked yet."""
    if backend == "mpirun":
        send(proc.pid, STOP_SIGNAL)  # forwarded to every rank, on every node
        return True
    if backend == "deepspeed" and len(hosts) > 1:
        if shutil.which("pdsh") is None:
            return False
        subprocess.Popen(remote_stop_command(hosts, script), stdin=subprocess.DEVNULL, start_new_session=True)
        return True
    # torchrun and deepspeed on one node would kill on any signal they handle, and die of one they do not: so the
    # ranks, all on this node and below this process, are asked directly.
    ranks = rank_processes(proc.pid, script)
    for pid in ranks:
        send(pid, STOP_SIGNAL)
    return bool(ranks)


def stop_at_once(proc, script, signum):
    """Pass the signal on as it is: to the ranks of this node, which stop at once on a second signal, and to the
    back-end, whose own handling ends the job (deepspeed's runner on one node does not pass it on)."""
    for pid in rank_processes(proc.pid, script):
        send(pid, signum)
    send(proc.pid, signum)


def backend_preexec():
    """What the back-end's process does before it starts: it gets SIGTERM when this launcher dies, even of SIGKILL
    (Linux's PR_SET_PDEATHSIG), so that a job whose launcher was killed stops too instead of running on unseen."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, launcher = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def set_parent_death_signal():
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != launcher:  # the launcher died before the line above
            os._exit(128 + signal.SIGTERM)

    return set_parent_death_signal


def run(cmd, env, backend, script, hosts=()):
    """Run the back-end as this process's child, in a session of its own (a Ctrl-C at the terminal then reaches only
    this launcher), turning the first SIGTERM or SIGINT into a stop request.  Returns the launcher's exit code: the
    back-end's, or 128 + the signal when a stop was asked for and the job did not end by itself (143 for SIGTERM,
    130 for SIGINT)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=backend_preexec())
    received = []

    def on_signal(signum, frame):
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) > 1:
            log(f"{name} again: stopping every rank now; a checkpoint still being written is dropped (resuming picks "
                "the last complete one)", own_line=True)
        elif request_stop(backend, proc, script, hosts):
            log(f"{name}: every rank finishes its step, saves a checkpoint and stops, however long the save takes; "
                f"{name} again stops at once", own_line=True)
            return
        else:
            log(f"{name}: no rank has started on this node yet, nothing to save: passing {name} on to {backend}",
                own_line=True)
        stop_at_once(proc, script, signum)

    previous = {signum: signal.signal(signum, on_signal) for signum in JOB_SIGNALS}
    try:
        returncode = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    code = 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N, as a shell reports it
    if received and code != 0:
        code = 128 + received[0]
        log(f"stopped on {signal.Signals(received[0]).name}: exit code {code}", own_line=True)
    return code


def main(argv=None):
    args = parse_args(argv)
    topology = detect_cpu_topology() if args.use_mpi else None
    try:
        if not os.path.isfile(args.training_script):
            raise LaunchError(f"training script {args.training_script!r} not found")
        cmd, extra_env = build_command(args, os.environ, topology)
        if not args.dry_run:
            check_launcher(args.backend)
    except LaunchError as exc:
        print(f"gaudi_spawn.py: error: {exc}", file=sys.stderr)
        return 2
    assignments = "".join(f"{name}={shlex.quote(value)} " for name, value in extra_env.items())
    if "DS_ENV_FILE" in extra_env:
        log(f"remote ranks get the variables in {extra_env['DS_ENV_FILE']} (DS_ENV_FILE): your {DEEPSPEED_ENV_FILE} "
            f"lines first, then what this launcher forwards")
    if args.dry_run:
        print(assignments + shlex.join(cmd))
        return 0
    log(f"world size {args.world_size} via {args.backend}")
    if args.use_mpi:
        log(f"cpu topology (sockets, cores per socket): {topology or 'unknown'}")
    log(f"running: {assignments}{shlex.join(cmd)}")
    sys.stdout.flush()
    env = {**os.environ, **extra_env, "MASTER_ADDR": str(args.master_addr), "MASTER_PORT": str(args.master_port)}
    try:
        hosts = read_hostfile(args.hostfile) if args.hostfile is not None else []
        return run(cmd, env, args.backend, str(args.training_script), hosts)
    except OSError as exc:
        print(f"gaudi_spawn.py: error: cannot start {cmd[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
