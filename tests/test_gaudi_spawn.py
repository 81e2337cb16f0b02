"""Tests for gaudi_spawn.py: exact commands (dry run / pure builders) and real launches."""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import needs_mpirun

REPO = Path(__file__).resolve().parents[1]
SPAWN = REPO / "gaudi_spawn.py"
PROBE = REPO / "tests" / "rank_probe.py"
PY = sys.executable

_spec = importlib.util.spec_from_file_location("gaudi_spawn", SPAWN)
gaudi_spawn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gaudi_spawn)

HAVE_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")

# The launching node's environment in the exact-command tests: forwarded and unrelated variables.
PINNED_ENV = {
    "PATH": "/usr/bin",
    "HOME": "/home/user",
    "PT_HPU_LAZY_MODE": "1",
    "HABANA_VISIBLE_MODULES": "0,1,2,3,4,5,6,7",
    "HCCL_SOCKET_IFNAME": "eth1",
    "GLOO_SOCKET_IFNAME": "eth1",
    "HF_HOME": "/data/hf",
    "TRANSFORMERS_VERBOSITY": "info",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "4",
    "MY_SETTING": "x",
}
# What mpirun must forward of PINNED_ENV, written out by hand (sorted by name).
PINNED_EXPORTS = [
    "GLOO_SOCKET_IFNAME", "HABANA_VISIBLE_MODULES", "HCCL_SOCKET_IFNAME", "HF_HOME", "PT_HPU_LAZY_MODE",
    "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(*args, env=None, timeout=120, python_flags=()):
    return subprocess.run(
        [PY, *python_flags, str(SPAWN), *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dry_run(monkeypatch, capsys, argv, topology=(2, 8), environ=PINNED_ENV):
    """Run main() in-process with a pinned machine and environment; return (exit code, printed command, stderr)."""
    monkeypatch.setattr(gaudi_spawn, "detect_cpu_topology", lambda: topology)
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    rc = gaudi_spawn.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out.strip(), captured.err


def exports(*names):
    return [arg for name in names for arg in ("-x", name)]


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two Gaudi nodes\nnode1 slots=8\n\nnode2 slots=8  # spare\n")
    return str(path)


# --------------------------------------------------------------------------- #
# Pure pieces
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "world_size,topology,binding",
    [
        (4, (2, 8), "--bind-to core --map-by socket:PE=4 --rank-by slot"),
        (3, (2, 3), "--bind-to core --map-by socket:PE=1 --rank-by slot"),  # 2 ranks share socket 0
        (4, (8, 1), "--bind-to core --map-by slot:PE=2 --rank-by slot"),  # one core per socket: a VM
        (4, (1, 2), "--bind-to none --map-by slot --oversubscribe --rank-by slot"),
        (4, None, "--bind-to none --map-by slot --oversubscribe --rank-by slot"),
    ],
)
def test_build_mpi_command_binding(world_size, topology, binding):
    cmd = gaudi_spawn.build_mpi_command(
        world_size, "t.py", ["--do_train"], "10.0.0.1", 1234, topology, ["HF_HOME"], None, 1
    )
    assert cmd == [
        "mpirun", "-n", str(world_size), *binding.split(), "--report-bindings", "--allow-run-as-root",
        *exports("MASTER_ADDR=10.0.0.1", "MASTER_PORT=1234", "HF_HOME"), PY, "-u", "t.py", "--do_train",
    ]


def find_optimum_habana_runner():
    spec = importlib.util.find_spec("optimum")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location, "habana", "distributed", "distributed_runner.py")
        if path.is_file():
            return path
    return None


@pytest.mark.parametrize("topology,world_size", [((2, 40), 8), ((2, 40), 4), ((2, 40), 2), ((8, 1), 4)])
def test_mpi_options_match_optimum_habana_runner(tmp_path, topology, world_size):
    """Cross-check against optimum-habana's own single-node mpirun command, run on a faked lscpu."""
    runner = find_optimum_habana_runner()
    if runner is None:
        pytest.skip("optimum-habana is not installed")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    lscpu = fake_bin / "lscpu"
    lscpu.write_text(f"#!/bin/sh\nprintf 'Socket(s):  {topology[0]}\\nCore(s) per socket:  {topology[1]}\\n'\n")
    lscpu.chmod(0o755)
    # The module file is loaded alone: importing optimum.habana would need Habana's software stack.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('distributed_runner', {str(runner)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        f"print(module.DistributedRunner(command_list=[], world_size={world_size}, use_mpi=True)._interpreter)\n"
    )
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    theirs = result.stdout.split()
    ours = gaudi_spawn.build_mpi_command(world_size, "t.py", [], "127.0.0.1", 29500, topology, [], None, 1)
    assert ours[: ours.index("-x")] == theirs[: theirs.index(PY)]


def make_sysfs(root, cpus):
    """A fake /sys/devices/system/cpu: {cpu: (package id, core id)}."""
    for cpu, (package, core) in cpus.items():
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")


@pytest.mark.parametrize(
    "allowed,expected",
    [(range(8), (2, 2)), ({0, 1, 2}, (1, 2)), ({0, 1, 4}, (2, 1)), ({0, 1, 2, 4}, (2, 1)), ({9}, None)],
)
def test_detect_cpu_topology_counts_cores_we_may_use(tmp_path, monkeypatch, allowed, expected):
    # 2 sockets x 2 cores x 2 hyper-threads; the siblings of core c are CPUs 2c and 2c + 1.
    make_sysfs(tmp_path, {cpu: (cpu // 4, cpu % 4 // 2) for cpu in range(8)})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allowed))
    assert gaudi_spawn.detect_cpu_topology(str(tmp_path)) == expected


@pytest.mark.skipif(not Path("/sys/devices/system/cpu/cpu0/topology").is_dir(), reason="no sysfs CPU topology")
def test_detect_cpu_topology_on_this_machine():
    sockets, cores_per_socket = gaudi_spawn.detect_cpu_topology()
    assert sockets >= 1 and cores_per_socket >= 1
    assert sockets * cores_per_socket <= len(os.sched_getaffinity(0))


def test_read_hostfile(hostfile, tmp_path):
    assert gaudi_spawn.read_hostfile(hostfile) == ["node1", "node2"]
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(gaudi_spawn.LaunchError, match="lists no hosts"):
        gaudi_spawn.read_hostfile(str(empty))
    with pytest.raises(gaudi_spawn.LaunchError, match="--hostfile .*cannot read"):
        gaudi_spawn.read_hostfile(str(tmp_path / "missing"))


def test_forwarded_env():
    assert gaudi_spawn.forwarded_env(PINNED_ENV) == PINNED_EXPORTS
    # The user's entries come last and replace a matching name's plain entry.
    assert gaudi_spawn.forwarded_env(PINNED_ENV, ["OMP_NUM_THREADS", "HF_HOME=/other"]) == [
        "GLOO_SOCKET_IFNAME", "HABANA_VISIBLE_MODULES", "HCCL_SOCKET_IFNAME", "PT_HPU_LAZY_MODE",
        "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY", "OMP_NUM_THREADS", "HF_HOME=/other",
    ]
    with pytest.raises(gaudi_spawn.LaunchError, match="--env NOT_SET"):
        gaudi_spawn.forwarded_env(PINNED_ENV, ["NOT_SET"])


# --------------------------------------------------------------------------- #
# Dry runs through main(): the exact commands
# --------------------------------------------------------------------------- #
def test_dry_run_mpi_single_node_seed_command(monkeypatch, capsys):
    # The README's 8-card command, plus --dry_run and two user variables.
    script_args = ["--model_name_or_path", "google/gemma-3-12b-it", "--do_train", "--output_dir", "./output_gemma3"]
    argv = ["--world_size", "8", "--use_mpi", "--env", "OMP_NUM_THREADS", "--env", "PROBE=a b", "--dry_run"]
    rc, out, _ = dry_run(monkeypatch, capsys, argv + ["run_lora_vlm.py", *script_args], topology=(2, 40))
    assert rc == 0
    assert out == shlex.join([
        "mpirun", "-n", "8", "--bind-to", "core", "--map-by", "socket:PE=10", "--rank-by", "slot",
        "--report-bindings", "--allow-run-as-root",
        *exports("MASTER_ADDR=127.0.0.1", "MASTER_PORT=29500", *PINNED_EXPORTS, "OMP_NUM_THREADS", "PROBE=a b"),
        PY, "-u", "run_lora_vlm.py", *script_args,
    ])


def test_dry_run_mpi_hostfile(monkeypatch, capsys, script, hostfile):
    argv = ["--world_size=16", "--use_mpi", f"--hostfile={hostfile}", "--master_port", "29501", "--dry_run", script]
    rc, out, _ = dry_run(monkeypatch, capsys, argv, topology=(2, 40))
    assert rc == 0
    # 8 ranks per node on 2 x 40 cores; the first host is the master.
    assert out == shlex.join([
        "mpirun", "-n", "16", "--bind-to", "core", "--map-by", "socket:PE=10", "--rank-by", "slot",
        "--report-bindings", "--allow-run-as-root", "--hostfile", hostfile,
        *exports("MASTER_ADDR=node1", "MASTER_PORT=29501", *PINNED_EXPORTS), PY, "-u", script,
    ])


@pytest.fixture
def deepspeed_dirs(tmp_path, monkeypatch):
    """(home, working directory) for DeepSpeed's environment files; this launcher's temporary folder under tmp_path."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return home, work


def ds_env_file(out):
    """The DS_ENV_FILE a printed deepspeed command sets, and the command after it."""
    assignment, _, command = out.partition(" ")
    name, _, path = assignment.partition("=")
    assert name == "DS_ENV_FILE", out
    return Path(path), command


def test_dry_run_deepspeed_hostfile(monkeypatch, capsys, script, hostfile, deepspeed_dirs, tmp_path):
    argv = ["--world_size", "16", "--use_deepspeed", "--hostfile", hostfile, "--dry_run"]
    rc, out, err = dry_run(monkeypatch, capsys, [*argv, script, "--deepspeed", "ds.json"])
    assert rc == 0
    env_file, command = ds_env_file(out)
    assert command == shlex.join([
        "deepspeed", "--num_nodes", "2", "--num_gpus", "8", "--no_local_rank", "--master_addr", "node1",
        "--master_port", "29500", "--hostfile", hostfile, script, "--deepspeed", "ds.json",
    ])
    # Remote ranks get what mpirun -x would forward, PT_HPU_LAZY_MODE first of all, from the file the dry run names.
    assert env_file.parent == tmp_path / "tmp" / f"gaudi_spawn-{os.getuid()}"
    assert env_file.read_text().splitlines() == [
        "GLOO_SOCKET_IFNAME=eth1", "HABANA_VISIBLE_MODULES=0,1,2,3,4,5,6,7", "HCCL_SOCKET_IFNAME=eth1",
        "HF_HOME=/data/hf", "PT_HPU_LAZY_MODE=1", "TOKENIZERS_PARALLELISM=false", "TRANSFORMERS_VERBOSITY=info",
    ]
    assert f"remote ranks get the variables in {env_file} (DS_ENV_FILE)" in err
    # An explicit --master_addr wins over the hostfile's first host.
    rc, out, _ = dry_run(monkeypatch, capsys, ["--master_addr", "10.1.2.3", *argv, script])
    assert rc == 0 and "--master_addr 10.1.2.3 " in out and "node1" not in out


def test_deepspeed_env_file_keeps_the_users_lines_first(monkeypatch, capsys, script, hostfile, deepspeed_dirs):
    home, work = deepspeed_dirs
    (home / ".deepspeed_env").write_text("HF_HOME=/mine\nNCCL_DEBUG=INFO\n")
    (work / ".deepspeed_env").write_text("PT_HPU_LAZY_MODE=0\nMY_FLAG=a=b\n")
    environ = {**PINNED_ENV, "HOME": str(home), "HF_TOKEN_PATH": "/path with space"}
    argv = ["--world_size", "16", "--use_deepspeed", "--hostfile", hostfile, "--dry_run", script]
    rc, out, _ = dry_run(monkeypatch, capsys, argv, environ=environ)
    assert rc == 0
    # DeepSpeed reads ~ then . (later lines win): kept verbatim, in that order; then what they leave unset, quoted
    # for the shell of the pdsh runner.
    assert ds_env_file(out)[0].read_text().splitlines() == [
        "HF_HOME=/mine", "NCCL_DEBUG=INFO", "PT_HPU_LAZY_MODE=0", "MY_FLAG=a=b",
        "GLOO_SOCKET_IFNAME=eth1", "HABANA_VISIBLE_MODULES=0,1,2,3,4,5,6,7", "HCCL_SOCKET_IFNAME=eth1",
        "HF_TOKEN_PATH='/path with space'", "TOKENIZERS_PARALLELISM=false", "TRANSFORMERS_VERBOSITY=info",
    ]
    # The user's own files are left as they were.
    assert (home / ".deepspeed_env").read_text() == "HF_HOME=/mine\nNCCL_DEBUG=INFO\n"
    assert (work / ".deepspeed_env").read_text() == "PT_HPU_LAZY_MODE=0\nMY_FLAG=a=b\n"
    # DS_ENV_FILE names the user's file instead: that one is read, as DeepSpeed would.
    (work / "my_env").write_text("A=1\n")
    rc, out, _ = dry_run(monkeypatch, capsys, argv, environ={**environ, "DS_ENV_FILE": str(work / "my_env")})
    assert rc == 0 and ds_env_file(out)[0].read_text().splitlines()[:2] == ["A=1", "GLOO_SOCKET_IFNAME=eth1"]


def test_deepspeed_on_one_host_needs_no_env_file(monkeypatch, capsys, script, deepspeed_dirs, tmp_path):
    one_host = tmp_path / "one_host"
    one_host.write_text("node1 slots=8\n")
    argv = ["--world_size", "8", "--use_deepspeed", "--hostfile", str(one_host), "--dry_run", script]
    rc, out, _ = dry_run(monkeypatch, capsys, argv)
    assert rc == 0 and out.startswith("deepspeed --num_nodes 1 --num_gpus 8 ")
    assert not list((tmp_path / "tmp").iterdir())


def test_dry_run_deepspeed_single_node(monkeypatch, capsys, script):
    rc, out, _ = dry_run(monkeypatch, capsys, ["--world_size", "8", "--use_deepspeed", "--dry_run", script, "--x"])
    assert rc == 0
    assert out == shlex.join([
        "deepspeed", "--num_nodes", "1", "--num_gpus", "8", "--no_local_rank", "--master_addr", "127.0.0.1",
        "--master_port", "29500", script, "--x",
    ])


def test_deepspeed_bad_world_size_or_hostfile(monkeypatch, capsys, script, hostfile, tmp_path):
    argv = ["--world_size", "3", "--use_deepspeed", "--hostfile", hostfile, "--dry_run", script]
    rc, _, err = dry_run(monkeypatch, capsys, argv)  # 3 ranks on 2 nodes
    assert rc == 2 and "not a multiple" in err
    argv = ["--use_deepspeed", "--hostfile", str(tmp_path / "nope"), "--dry_run", script]
    rc, _, err = dry_run(monkeypatch, capsys, argv)
    assert rc == 2 and "--hostfile" in err


def test_dry_run_torchrun_exact_via_cli(script):
    result = spawn("--world_size", "2", "--dry_run", script, "--do_train", "--output_dir", "out dir")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shlex.join([
        PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", "29500", script, "--do_train", "--output_dir", "out dir",
    ])
    assert "Traceback" not in result.stderr


def test_script_args_with_spaces_and_quotes_survive(monkeypatch, capsys, script):
    tricky = ["--prompt", "a photo of 'a cat' \"quoted\"", "--empty", "", "--dollar", "$HOME; rm -rf /", "--", "-x"]
    rc, out, _ = dry_run(monkeypatch, capsys, ["--dry_run", script, *tricky])
    assert rc == 0
    assert shlex.split(out)[-len(tricky) - 1 :] == [script, *tricky]


def test_flags_after_script_belong_to_script(monkeypatch, capsys, script):
    script_args = ["--world_size", "7", "--use_deepspeed", "--help", "--master_port", "1", "--env", "X", "--do_train"]
    rc, out, _ = dry_run(monkeypatch, capsys, ["--world_size", "2", "--use_mpi", "--dry_run", script, *script_args])
    assert rc == 0
    cmd = shlex.split(out)
    assert cmd[:3] == ["mpirun", "-n", "2"]
    assert "MASTER_PORT=29500" in cmd
    assert cmd[cmd.index(script) + 1 :] == script_args


@pytest.mark.parametrize(
    "args,message",
    [
        (("--world_size", "0"), "--world_size"),
        (("--use_mpi", "--use_deepspeed"), "--use_deepspeed"),
        (("--hostfile", "h"), "--hostfile"),  # torchrun: one node only
        (("--env", "HF_HOME"), "--env needs --use_mpi"),
        (("--use_mpi", "--env", "BAD NAME"), "--env 'BAD NAME'"),
        (("--use_mpi", "--env", "SURELY_NOT_SET_42"), "--env SURELY_NOT_SET_42"),
        (("--master_port", "70000"), "--master_port"),
    ],
)
def test_usage_errors(script, args, message):
    result = spawn(*args, "--dry_run", script)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_script_or_no_arguments():
    result = spawn("--use_mpi", "does/not/exist.py")
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr
    result = spawn()
    assert result.returncode == 2 and "training_script" in result.stderr


def test_import_is_side_effect_free():
    code = (
        "import sys, os; sys.argv = ['x', '--bogus']; before = dict(os.environ); "
        f"sys.path.insert(0, {str(REPO)!r}); import gaudi_spawn; "
        "assert dict(os.environ) == before; "
        "assert not {'torch', 'transformers', 'optimum'} & set(sys.modules), sorted(sys.modules)"
    )
    result = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- #
# Missing launchers
# --------------------------------------------------------------------------- #
def test_missing_mpirun_is_a_clear_error(tmp_path, script):
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    result = spawn("--world_size", "2", "--use_mpi", script, env=env)
    assert result.returncode == 2
    assert "mpirun" in result.stderr and "apt-get install openmpi-bin" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_deepspeed_is_a_clear_error(tmp_path, script):
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    result = spawn("--world_size", "2", "--use_deepspeed", script, env=env)
    assert result.returncode == 2
    assert "pip install deepspeed" in result.stderr and "Traceback" not in result.stderr


def test_missing_torch_is_a_clear_error(script):
    # python -S hides site-packages, so this launcher sees no torch (and proves it is stdlib-only).
    result = spawn("--world_size", "2", script, python_flags=("-S",))
    assert result.returncode == 2
    assert "pip install torch" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- #
# Real launches
# --------------------------------------------------------------------------- #
def read_ranks(out_dir, world_size):
    records = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert [r["rank"] for r in records] == list(range(world_size))
    return records


@needs_mpirun
def test_mpirun_two_ranks_agree(tmp_path):
    out = tmp_path / "out dir"
    port = free_port()
    extra = ["--allreduce"] if HAVE_TORCH else []
    tricky = "value with 'spaces' and \"quotes\""
    env = {**os.environ, "PT_HPU_PROBE_SETTING": "on"}
    env.pop("GAUDI_SPAWN_PROBE", None)
    result = spawn(
        "--world_size", "2", "--use_mpi", "--master_port", port, "--env", "GAUDI_SPAWN_PROBE=from the flag",
        PROBE, "--out", out, "--env_name", "GAUDI_SPAWN_PROBE", "--env_name", "PT_HPU_PROBE_SETTING", *extra, tricky,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "world size 2" in result.stderr and "running: mpirun -n 2" in result.stderr
    assert "-x PT_HPU_PROBE_SETTING" in result.stderr
    records = read_ranks(out, 2)
    for rank, record in enumerate(records):
        assert record["source"] == "ompi"
        assert (record["world_size"], record["local_rank"]) == (2, rank)
        assert (record["master_addr"], record["master_port"]) == ("127.0.0.1", str(port))
        assert record["python"] == PY
        assert record["extra"] == [tricky]
        # GAUDI_SPAWN_PROBE is not in the launcher's environment: only mpirun -x can set it.
        assert record["env"] == {"GAUDI_SPAWN_PROBE": "from the flag", "PT_HPU_PROBE_SETTING": "on"}
        if HAVE_TORCH:
            assert record["allreduce_sum"] == 3.0  # (0 + 1) + (1 + 1)
    assert records[0]["pid"] != records[1]["pid"]


@needs_torch
def test_torchrun_two_ranks_agree(tmp_path):
    out = tmp_path / "out"
    port = free_port()
    result = spawn("--world_size", "2", "--master_port", port, PROBE, "--out", out, "--allreduce")
    assert result.returncode == 0, result.stdout + result.stderr
    for rank, record in enumerate(read_ranks(out, 2)):
        assert record["source"] == "torchrun"
        assert (record["world_size"], record["local_rank"]) == (2, rank)
        assert record["master_port"] == str(port)
        assert record["allreduce_sum"] == 3.0


@needs_mpirun
def test_failing_rank_exit_code_reaches_caller_through_mpirun(tmp_path):
    result = spawn("--world_size", "2", "--use_mpi", PROBE, "--out", tmp_path, "--fail_rank", "1")
    assert result.returncode == 3  # the rank's own exit code: mpirun returns the first failure's status
    assert "failing on purpose" in result.stderr


@needs_torch
def test_failing_rank_fails_torchrun(tmp_path):
    result = spawn("--world_size", "2", "--master_port", free_port(), PROBE, "--out", tmp_path, "--fail_rank", "1")
    assert result.returncode != 0
    assert "failing on purpose" in result.stderr


def pid_alive(pid):
    """True if pid runs (zombies count as dead: nobody may reap them in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [arg.decode() for arg in f.read().split(b"\0") if arg]


@pytest.mark.parametrize(
    "backend,signum",
    [
        # The other two pairs go through the training script's own handling in tests/test_launcher_signals.py.
        pytest.param("mpirun", signal.SIGINT, marks=needs_mpirun),
        pytest.param("torchrun", signal.SIGINT, marks=needs_torch),
    ],
)
def test_signal_to_launcher_stops_every_rank(tmp_path, backend, signum):
    """rank_probe.py does not handle the stop request (SIGUSR1), so it dies of it: the launcher still ends every rank
    and reports the signal it got (the training script's own handling: tests/test_launcher_signals.py)."""
    backend_flags = ["--use_mpi"] if backend == "mpirun" else ["--master_port", str(free_port())]
    launcher = subprocess.Popen(
        [PY, str(SPAWN), "--world_size", "2", *backend_flags, str(PROBE), "--out", str(tmp_path), "--sleep", "60"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_files = [tmp_path / "pid0", tmp_path / "pid1"]
    try:
        deadline = time.monotonic() + 120  # a hang guard, not a timing
        while not all(p.exists() and p.read_text() for p in pid_files):
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.05)
        rank_pids = [int(p.read_text()) for p in pid_files]
        assert all(pid_alive(pid) for pid in rank_pids)
        # The launcher stays the parent of the back-end, which runs in a session of its own.
        assert str(SPAWN) in cmdline(launcher.pid)
        backends = {parent_pid(pid) for pid in rank_pids}
        assert len(backends) == 1 and parent_pid(backends.pop()) == launcher.pid
        assert os.getsid(rank_pids[0]) != os.getsid(launcher.pid)
        assert gaudi_spawn.rank_processes(launcher.pid, str(PROBE)) == sorted(rank_pids)

        launcher.send_signal(signum)
        # The ranks sleep 60 s: stopped by the signal, they never write their result (checked below), whatever the
        # machine's speed; the timeout only guards against a hang.
        _, err = launcher.communicate(timeout=120)
        assert launcher.returncode == 128 + signum, err
        assert f"[gaudi_spawn] stopped on {signum.name}: exit code {128 + signum}" in err
        deadline = time.monotonic() + 30  # a hang guard: a signalled rank is gone at once
        while any(pid_alive(pid) for pid in rank_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(pid) for pid in rank_pids)
        assert not (tmp_path / "rank0.json").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def parent_pid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["python", "-u", "train.py", "--x"], True),
        (["/usr/bin/python3", "train.py"], True),
        (["python", "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py"], False),
        (["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "train.py"], False),
        (["mpirun", "-n", "2", "python", "-u", "train.py"], False),
        (["python", "-c", "code", "train.py"], False),
        (["python", "other.py", "train.py"], False),
        (["train.py"], False),
    ],
)
def test_runs_script(argv, expected):
    assert gaudi_spawn.runs_script(argv, "train.py") is expected


def test_the_stop_request_reaches_the_ranks_not_their_launchers_nor_their_forks(tmp_path):
    """A process tree as deepspeed's on one node builds it: runner, then a launcher that names the script among its
    own arguments, then the ranks, each with a forked data loader worker (same command line). Only the ranks handle
    SIGUSR1; any other process it reached would die of it."""
    script = tmp_path / "train.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "rank, out = sys.argv[1], sys.argv[2]\n"
        "worker = os.fork()\n"
        "if worker == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "signal.signal(signal.SIGUSR1, lambda *_: open(os.path.join(out, 'stop' + rank), 'w').close())\n"
        "open(os.path.join(out, 'rank' + rank), 'w').write(f'{os.getpid()} {worker}')\n"
        "time.sleep(60)\n"
    )
    launcher_code = (
        "import subprocess, sys, time\n"
        "for rank in range(2): subprocess.Popen([sys.executable, '-u', sys.argv[1], str(rank), sys.argv[2]])\n"
        "time.sleep(60)\n"
    )
    backend_code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2], sys.argv[3]])\n"
        "time.sleep(60)\n"
    )
    backend = subprocess.Popen([PY, "-c", backend_code, launcher_code, str(script), str(tmp_path)],
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # a hang guard, not a timing
        while not all((tmp_path / f"rank{r}").exists() and (tmp_path / f"rank{r}").read_text() for r in range(2)):
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.05)
        ranks, workers = zip(*(map(int, (tmp_path / f"rank{r}").read_text().split()) for r in range(2)))
        assert gaudi_spawn.rank_processes(backend.pid, str(script)) == sorted(ranks)
        assert gaudi_spawn.rank_processes(backend.pid, str(tmp_path / "other.py")) == []

        assert gaudi_spawn.request_stop("deepspeed", backend, str(script))
        deadline = time.monotonic() + 120  # a hang guard, not a timing
        while not all((tmp_path / f"stop{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline, "the ranks got no stop request"
            time.sleep(0.05)
        launcher = parent_pid(ranks[0])
        assert launcher != backend.pid and parent_pid(launcher) == backend.pid
        time.sleep(0.5)  # would a stray SIGUSR1 have killed one of them, it would be gone by now
        assert all(pid_alive(pid) for pid in (backend.pid, launcher, *ranks, *workers))
    finally:
        os.killpg(backend.pid, signal.SIGKILL)
        backend.wait()


@pytest.mark.skipif(shutil.which("pkill") is None, reason="procps' pkill not installed")
def test_the_remote_stop_request_reaches_deepspeed_ranks_only(tmp_path):
    """DeepSpeed on several hosts starts every rank over pdsh: the stop request goes the same way, as a pkill run on
    each host. Run here without pdsh on stand-ins with the command lines DeepSpeed gives its per-node launcher and its
    ranks (deepspeed/launcher/launch.py): only the rank gets it."""
    script = f"probe_{os.getpid()}.py"  # named as the user gave it, relative, as DeepSpeed passes it on
    command = gaudi_spawn.remote_stop_command(["node1", "node2"], script)
    assert command[:4] == ["pdsh", "-S", "-w", "node1,node2"]
    (tmp_path / script).write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *_: open(sys.argv[-1], 'w').close())\n"
        "open(sys.argv[-1] + '.ready', 'w').close()\n"
        "time.sleep(60)\n")
    stand_ins = {
        "rank": [PY, "-u", script, "--model_name_or_path", "m", str(tmp_path / "rank")],
        "node launcher": [PY, "-u", "-c", (tmp_path / script).read_text(), "--no_local_rank", script,
                          str(tmp_path / "launcher")],
    }
    processes = [subprocess.Popen(argv, cwd=tmp_path) for argv in stand_ins.values()]
    try:
        deadline = time.monotonic() + 120  # a hang guard, not a timing
        while not all((tmp_path / f"{name}.ready").exists() for name in ("rank", "launcher")):
            assert time.monotonic() < deadline, "the stand-ins did not start"
            time.sleep(0.05)
        subprocess.run(["bash", "-c", command[4]], check=False, timeout=60)  # what pdsh runs on each host
        while not (tmp_path / "rank").exists():
            assert time.monotonic() < deadline, "the rank got no stop request"
            time.sleep(0.05)
        time.sleep(0.5)  # a stray request to the launcher would have landed by now
        assert not (tmp_path / "launcher").exists() and processes[1].poll() is None
    finally:
        for process in processes:
            process.kill()
            process.wait()
