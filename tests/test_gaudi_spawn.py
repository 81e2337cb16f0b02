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
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
SPAWN = REPO / "gaudi_spawn.py"
PROBE = REPO / "tests" / "rank_probe.py"
PY = sys.executable

_spec = importlib.util.spec_from_file_location("gaudi_spawn", SPAWN)
gaudi_spawn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gaudi_spawn)

needs_mpirun = pytest.mark.skipif(
    shutil.which("mpirun") is None, reason="mpirun not installed (apt-get install openmpi-bin)"
)
HAVE_TORCH = importlib.util.find_spec("torch") is not None


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


def dry_run(monkeypatch, capsys, argv, topology=(2, 8), root=False):
    """Run main() in-process with a pinned machine; return (exit code, printed command)."""
    monkeypatch.setattr(gaudi_spawn, "detect_cpu_topology", lambda: topology)
    monkeypatch.setattr(gaudi_spawn, "is_root", lambda: root)
    rc = gaudi_spawn.main(argv)
    return rc, capsys.readouterr().out.strip()


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


# --------------------------------------------------------------------------- #
# Pure builders
# --------------------------------------------------------------------------- #
def test_build_mpi_command_enough_cores_not_root():
    cmd = gaudi_spawn.build_mpi_command(4, "train.py", ["--do_train"], "127.0.0.1", 29500, 8, 2, False, python="/py")
    assert cmd == (
        "mpirun -n 4 --bind-to core --map-by socket:PE=4 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 "
        "/py -u train.py --do_train"
    ).split()


def test_build_mpi_command_root_uneven_sockets():
    # 3 ranks on 2 sockets x 3 cores: 2 ranks share a socket -> 1 core each.
    cmd = gaudi_spawn.build_mpi_command(3, "t.py", [], "10.0.0.1", 1234, 3, 2, True, python="/py")
    assert cmd == (
        "mpirun -n 3 --allow-run-as-root --bind-to core --map-by socket:PE=1 "
        "-x MASTER_ADDR=10.0.0.1 -x MASTER_PORT=1234 /py -u t.py"
    ).split()


@pytest.mark.parametrize("cores_per_socket,sockets", [(2, 1), (None, None)])
def test_build_mpi_command_fewer_or_unknown_cores(cores_per_socket, sockets):
    cmd = gaudi_spawn.build_mpi_command(
        4, "t.py", ["a"], "127.0.0.1", 29500, cores_per_socket, sockets, True, python="/py"
    )
    assert cmd == (
        "mpirun -n 4 --allow-run-as-root --bind-to none --map-by slot --oversubscribe "
        "-x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 /py -u t.py a"
    ).split()


def test_build_mpi_command_hostfile_uses_ranks_per_node():
    cmd = gaudi_spawn.build_mpi_command(
        16, "t.py", [], "node1", 29500, 40, 2, False, hostfile="hosts", num_nodes=2, python="/py"
    )
    assert cmd == (
        "mpirun -n 16 --hostfile hosts --bind-to core --map-by socket:PE=10 "
        "-x MASTER_ADDR=node1 -x MASTER_PORT=29500 /py -u t.py"
    ).split()


def test_build_deepspeed_and_torchrun_commands():
    assert gaudi_spawn.build_deepspeed_command(8, "t.py", ["--x"], "127.0.0.1", 29500) == (
        "deepspeed --num_nodes 1 --num_gpus 8 --master_addr 127.0.0.1 --master_port 29500 t.py --x"
    ).split()
    assert gaudi_spawn.build_torchrun_command(2, "t.py", ["--x"], "localhost", 1, python="/py") == (
        "/py -m torch.distributed.run --nproc_per_node 2 --master_addr localhost --master_port 1 t.py --x"
    ).split()
    with pytest.raises(gaudi_spawn.LaunchError, match="not a multiple"):
        gaudi_spawn.build_deepspeed_command(6, "t.py", [], "a", 1, hostfile="h", num_nodes=4)


CPUINFO_2S_HT = "\n\n".join(
    f"processor\t: {cpu}\nphysical id\t: {cpu // 4 % 2}\ncore id\t\t: {cpu % 2}\nsiblings\t: 4" for cpu in range(8)
)


def test_parse_cpuinfo_lscpu_and_hostfile():
    # 8 logical CPUs = 2 sockets x 2 cores x 2 hyper-threads.
    assert gaudi_spawn.parse_cpuinfo(CPUINFO_2S_HT) == (2, 2)
    assert gaudi_spawn.parse_cpuinfo(CPUINFO_2S_HT, allowed_cpus={0, 1}) == (1, 2)
    assert gaudi_spawn.parse_cpuinfo("processor : 0\nBogoMIPS : 1\n") is None  # e.g. aarch64
    assert gaudi_spawn.parse_lscpu("Socket(s):   2\nCore(s) per socket:  40\n") == (2, 40)
    assert gaudi_spawn.parse_lscpu("nothing useful") is None
    assert gaudi_spawn.parse_hostfile("# c\nnode1 slots=8\n\n  node2 slots=8  # x\n") == ["node1", "node2"]


def test_detect_cpu_topology_matches_machine():
    topology = gaudi_spawn.detect_cpu_topology()
    assert topology is None or (topology[0] >= 1 and topology[1] >= 1)


# --------------------------------------------------------------------------- #
# Dry runs through main()
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "root,topology,expected_binding",
    [
        (True, (2, 8), "--allow-run-as-root --bind-to core --map-by socket:PE=4"),
        (False, (2, 8), "--bind-to core --map-by socket:PE=4"),
        (True, (1, 2), "--allow-run-as-root --bind-to none --map-by slot --oversubscribe"),
        (False, (1, 2), "--bind-to none --map-by slot --oversubscribe"),
    ],
)
def test_dry_run_mpi_exact(monkeypatch, capsys, script, root, topology, expected_binding):
    rc, out = dry_run(
        monkeypatch,
        capsys,
        ["--world_size", "4", "--use_mpi", "--master_port", "29501", "--dry_run", script, "--do_train"],
        topology=topology,
        root=root,
    )
    assert rc == 0
    assert out == (
        f"mpirun -n 4 {expected_binding} -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29501 "
        f"{shlex.quote(PY)} -u {shlex.quote(script)} --do_train"
    )


def test_dry_run_mpi_hostfile(monkeypatch, capsys, script, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    rc, out = dry_run(
        monkeypatch, capsys, ["--world_size=16", "--use_mpi", f"--hostfile={hostfile}", "--dry_run", script], (2, 40)
    )
    assert rc == 0
    assert out == (
        f"mpirun -n 16 --hostfile {hostfile} --bind-to core --map-by socket:PE=10 "
        f"-x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 {PY} -u {script}"
    )


def test_dry_run_deepspeed_hostfile_exact(monkeypatch, capsys, script, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two Gaudi nodes\nnode1 slots=8\n\nnode2 slots=8\n")
    argv = ["--world_size", "16", "--use_deepspeed", "--hostfile", str(hostfile), "--master_addr", "node1"]
    rc, out = dry_run(monkeypatch, capsys, argv + ["--dry_run", script, "--deepspeed", "ds.json"])
    assert rc == 0
    assert out == (
        "deepspeed --num_nodes 2 --num_gpus 8 --master_addr node1 --master_port 29500 "
        f"--hostfile {hostfile} {script} --deepspeed ds.json"
    )


def test_deepspeed_bad_world_size_or_hostfile(monkeypatch, capsys, script, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    argv = ["--world_size", "3", "--use_deepspeed", "--hostfile", str(hostfile), "--dry_run", script]
    rc, _ = dry_run(monkeypatch, capsys, argv)  # 3 ranks on 2 nodes
    assert rc == 2
    argv = ["--use_deepspeed", "--hostfile", str(tmp_path / "nope"), "--dry_run", script]
    rc, _ = dry_run(monkeypatch, capsys, argv)
    assert rc == 2


def test_dry_run_torchrun_exact_via_cli(script):
    result = spawn("--world_size", "2", "--dry_run", script, "--do_train", "--output_dir", "/tmp/o")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{PY} -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29500 "
        f"{script} --do_train --output_dir /tmp/o"
    )
    assert "Traceback" not in result.stderr


def test_script_args_with_spaces_and_quotes_survive(monkeypatch, capsys, script):
    tricky = ["--prompt", "a photo of 'a cat' \"quoted\"", "--empty", "", "--dollar", "$HOME; rm -rf /", "--", "-x"]
    rc, out = dry_run(monkeypatch, capsys, ["--dry_run", script, *tricky])
    assert rc == 0
    assert shlex.split(out)[-len(tricky) - 1 :] == [script, *tricky]


def test_flags_after_script_belong_to_script(monkeypatch, capsys, script):
    script_args = ["--world_size", "7", "--use_deepspeed", "--help", "--master_port", "1", "--do_train"]
    rc, out = dry_run(monkeypatch, capsys, ["--world_size", "2", "--use_mpi", "--dry_run", script, *script_args])
    assert rc == 0
    cmd = shlex.split(out)
    assert cmd[:3] == ["mpirun", "-n", "2"]
    assert "MASTER_PORT=29500" in cmd
    assert cmd[cmd.index(script) + 1 :] == script_args


def test_usage_errors(script):
    assert spawn("--world_size", "0", script).returncode == 2
    assert spawn("--use_mpi", "--use_deepspeed", script).returncode == 2
    assert spawn("--hostfile", "h", script).returncode == 2  # torchrun: single node only
    result = spawn("--use_mpi", "does/not/exist.py")
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr
    assert spawn().returncode == 2


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
    result = spawn("--world_size", "2", "--use_mpi", "--master_port", port, PROBE, "--out", out, *extra, tricky)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "world size 2" in result.stderr and "running: mpirun -n 2" in result.stderr
    records = read_ranks(out, 2)
    for rank, record in enumerate(records):
        assert record["source"] == "ompi"
        assert (record["world_size"], record["local_rank"]) == (2, rank)
        assert (record["master_addr"], record["master_port"]) == ("127.0.0.1", str(port))
        assert record["python"] == PY
        assert record["extra"] == [tricky]
        if HAVE_TORCH:
            assert record["allreduce_sum"] == 3.0  # (0 + 1) + (1 + 1)
    assert records[0]["pid"] != records[1]["pid"]


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
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
def test_failing_rank_propagates_exit_code(tmp_path):
    result = spawn("--world_size", "2", "--use_mpi", PROBE, "--out", tmp_path, "--fail_rank", "1")
    assert result.returncode != 0
    assert "failing on purpose" in result.stderr


def pid_alive(pid):
    """True if pid runs (zombies count as dead: nobody may reap them in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


@needs_mpirun
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_every_rank(tmp_path, signum):
    launcher = subprocess.Popen(
        [PY, str(SPAWN), "--world_size", "2", "--use_mpi", str(PROBE), "--out", str(tmp_path), "--sleep", "60"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_files = [tmp_path / "pid0", tmp_path / "pid1"]
    try:
        deadline = time.monotonic() + 15
        while not all(p.exists() and p.read_text() for p in pid_files):
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.05)
        rank_pids = [int(p.read_text()) for p in pid_files]
        assert all(pid_alive(pid) for pid in rank_pids)

        start = time.monotonic()
        launcher.send_signal(signum)
        _, stderr = launcher.communicate(timeout=10)
        assert time.monotonic() - start < 10
        assert launcher.returncode != 0
        assert "forwarding" in stderr
        deadline = time.monotonic() + 5
        while any(pid_alive(pid) for pid in rank_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(pid) for pid in rank_pids)
        assert not (tmp_path / "rank0.json").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


STUBBORN_CHILD = r"""
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
# A "rank" in a process group of its own, as mpirun does it, that ignores SIGTERM too.
rank = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"],
    start_new_session=True,
)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {rank.pid}")
time.sleep(60)
"""


def test_stubborn_ranks_are_killed_after_grace(tmp_path):
    pid_file = tmp_path / "pids"
    driver = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); import gaudi_spawn; "
        f"sys.exit(gaudi_spawn.run_command([sys.executable, '-c', {STUBBORN_CHILD!r}, {str(pid_file)!r}], "
        "None, grace_seconds=1))"
    )
    proc = subprocess.Popen([PY, "-c", driver], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not (pid_file.exists() and len(pid_file.read_text().split()) == 2):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pids = [int(p) for p in pid_file.read_text().split()]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 128 + signal.SIGKILL
        assert "killing them" in stderr
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
