"""Ray on the network: a local search's Ray listens on 127.0.0.1 only; trials are sized to fit every node of a
cluster; and a real two-node Ray cluster on this machine runs `search --address` on both nodes, loses its worker node
mid-search, and the search still finishes with the lost trial recorded as failed and why.

Processes and sockets are read from /proc (Linux); elsewhere these tests skip.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from automl_ad.data.demo import generate_demo
from automl_ad.errors import UsageError
from automl_ad.search.ray_runtime import RAY_CLUSTER_MODE_ENV, concurrency, memory_per_trial
from automl_ad.tracking.store import Tracker

PROC = Path("/proc")
needs_proc = pytest.mark.skipif(not (PROC / "net" / "tcp").is_file(),
                                reason="processes and sockets are listed from /proc, which this platform lacks")
RAY = Path(sys.executable).with_name("ray")

LOCAL_RAY = ("import sys\n"
             "from automl_ad.search.ray_runtime import start_ray\n"
             "start_ray(None)\n"
             "import ray\n"
             "@ray.remote\n"
             "def node():\n"
             "    return ray.get_runtime_context().get_node_id()\n"
             "ray.get([node.remote() for _ in range(2)])  # workers are started and listening too\n"
             "print('ready', flush=True)\n"
             "sys.stdin.readline()\n"
             "ray.shutdown()\n")


# --- processes and sockets, from /proc ----------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of a live process, or None once it is gone."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[2])


def _processes() -> dict[int, tuple[int, int]]:
    stats = {int(p.name): _stat(int(p.name)) for p in PROC.iterdir() if p.name.isdigit()}
    return {pid: stat for pid, stat in stats.items() if stat is not None}


def _with_descendants(roots: set[int]) -> set[int]:
    processes, found = _processes(), set(roots)
    while True:
        children = {pid for pid, (ppid, _) in processes.items() if ppid in found} - found
        if not children:
            return found
        found |= children


def _group(pgid: int) -> set[int]:
    """Everything a `ray start` left running: its process group (daemons) and their children (Ray workers have
    process groups of their own, and trial processes are their children)."""
    return _with_descendants({pid for pid, (_, group) in _processes().items() if group == pgid})


def _cmdline(pid: int) -> list[str]:
    try:
        return [a for a in (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)  # /proc/net/tcp*: 32-bit words in host (little-endian) order
    packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(packed)
    return getattr(address, "ipv4_mapped", None) or address


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket listened on by one of ``pids``."""
    owners = {}
    for pid in pids:
        try:
            for fd in (PROC / str(pid) / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owners[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("tcp", "tcp6"):
        path = PROC / "net" / table
        for line in path.read_text().splitlines()[1:] if path.is_file() else []:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in owners:  # 0A: LISTEN
                host, port = local.rsplit(":", 1)
                name = (PROC / str(owners[inode]) / "comm").read_text().strip()
                found.append((str(_address(host)), int(port, 16), name))
    return found


# --- a local search's Ray ------------------------------------------------------------------------------------------
@needs_proc
def test_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in (RAY_CLUSTER_MODE_ENV, "RAY_ADDRESS")}
    driver = subprocess.Popen([sys.executable, "-c", LOCAL_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**env, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        assert driver.stdout.readline().strip() == "ready"
        sockets = _listening(_with_descendants({driver.pid}))
        names = {name for _, _, name in sockets}
        assert {"gcs_server", "raylet"} <= names, sockets  # Ray's servers were seen, so the check below means something
        exposed = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback]
        assert not exposed, f"Ray listens beyond 127.0.0.1: {exposed}"
        driver.stdin.write("\n")
        driver.stdin.flush()
        assert driver.wait(timeout=120) == 0
    finally:
        _kill(_with_descendants({driver.pid}))
        driver.wait()


def test_local_ray_refuses_to_start_exposed():
    """Ray imported before the search, in cluster mode, would listen on the network: refused, saying what to do."""
    code = ("import ray, sys\n"
            "from automl_ad.errors import UsageError\n"
            "from automl_ad.search.ray_runtime import start_ray\n"
            "try:\n"
            "    start_ray(None)\n"
            "except UsageError as exc:\n"
            "    print(exc)\n"
            "    sys.exit(3)\n"
            "print(ray.util.get_node_ip_address())\n"
            "ray.shutdown()\n")
    env = {**{k: v for k, v in os.environ.items() if k != RAY_CLUSTER_MODE_ENV}, RAY_CLUSTER_MODE_ENV: "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    if result.returncode == 0:  # a machine whose only address is the loopback one: nothing was exposed
        assert ipaddress.ip_address(result.stdout.split()[-1]).is_loopback
    else:
        assert result.returncode == 3, result.stderr[-2000:]
        assert "reachable from the network" in result.stdout and f"{RAY_CLUSTER_MODE_ENV}=0" in result.stdout


# --- trials per node ------------------------------------------------------------------------------------------------
def _node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


@pytest.mark.parametrize("nodes, expected", [
    ([_node(8)], (2, {"cpu": 4}, 4)),  # one machine: 4 threads a trial
    ([_node(1), _node(1)], (2, {"cpu": 1}, 1)),  # the test cluster: one trial on each node
    ([_node(16), _node(2)], (9, {"cpu": 2}, 2)),  # a trial fits on the small node too, with the same threads
    ([_node(0), _node(4), _node(64, alive=False)], (1, {"cpu": 4}, 4)),  # a CPU-less head and a dead node: skipped
    ([_node(8, gpus=2), _node(32)], (2, {"cpu": 4, "gpu": 1}, 4)),  # one trial per GPU
    ([_node(4, gpus=2), _node(12, gpus=1)], (3, {"cpu": 2, "gpu": 1}, 2)),
])
def test_trials_fit_every_node(monkeypatch, nodes, expected):
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(nodes=lambda: nodes))  # not the real ray: see start_ray
    assert concurrency() == expected


def test_a_trial_may_use_the_memory_of_the_node_it_shares_least(monkeypatch):
    """Ray's memory on a node, divided among the trials the node runs at once; the smallest share bounds a trial."""
    gib = 2 ** 30
    nodes = [{**_node(8), "Resources": {"CPU": 8, "memory": 24 * gib}},  # two trials of 4 threads: 12 GiB each
             {**_node(4), "Resources": {"CPU": 4, "memory": 16 * gib}},  # one: 16 GiB
             {**_node(1), "Resources": {"CPU": 1, "memory": 1 * gib}}]  # no room for a trial: not counted
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(nodes=lambda: nodes))
    assert memory_per_trial({"cpu": 4}) == 12 * gib
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(nodes=lambda: [_node(8)]))  # Ray reports no memory
    assert memory_per_trial({"cpu": 4}) is None


def test_a_trial_with_a_gpu_may_use_no_more_than_the_smallest_gpu_holds(monkeypatch):
    """nvidia-smi lists 24 and 16 GiB GPUs: a GPU trial on a node sharing 48 GiB among 2 trials gets 16 GiB; a CPU
    trial the host share; without a readable nvidia-smi, the host share."""
    import subprocess

    import automl_ad.search.ray_runtime as runtime

    gib = 2 ** 30
    nodes = [{**_node(8), "Resources": {"CPU": 8, "GPU": 2, "memory": 48 * gib}}]
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(nodes=lambda: nodes))
    listed = SimpleNamespace(stdout="24576\n16384\n")
    monkeypatch.setattr(runtime.subprocess, "run", lambda *a, **k: listed)
    assert memory_per_trial({"cpu": 4, "gpu": 1}) == 16 * gib
    assert memory_per_trial({"cpu": 4}) == 24 * gib

    for error in (FileNotFoundError("nvidia-smi"), subprocess.CalledProcessError(9, "nvidia-smi")):
        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(runtime.subprocess, "run", failing)
        assert memory_per_trial({"cpu": 4, "gpu": 1}) == 24 * gib


def test_cluster_without_cpus_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(nodes=lambda: [_node(0), _node(8, alive=False)]))
    with pytest.raises(UsageError, match="no live node with a CPU"):
        concurrency()


# --- a real two-node cluster ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], env: dict, log: Path, groups: list[int]) -> int:
    """Run `ray start` in a session of its own, whose process group the node's daemons keep; the group is added to
    ``groups`` (to be killed afterwards) before anything can fail. Returns it."""
    with log.open("a") as out:
        process = subprocess.Popen([str(RAY), "start", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    groups.append(process.pid)
    assert process.wait(timeout=240) == 0, log.read_text()[-3000:]
    return process.pid


def _node_id(pgid: int) -> str:
    """The Ray node id of the raylet that a `ray start` launched."""
    for pid in _group(pgid):
        args = _cmdline(pid)
        if args and args[0].endswith("/raylet"):
            return next(a.split("=", 1)[1] for a in args if a.startswith("--node_id="))
    raise AssertionError(f"no raylet in process group {pgid}")


def _running_trial(pgid: int) -> str | None:
    """Id of a search trial whose process runs on the node that `ray start` launched, if any."""
    for pid in _group(pgid):
        args = _cmdline(pid)
        if "automl_ad.search.trial" in args:
            return Path(args[-1]).parent.name  # python -m automl_ad.search.trial <work>/trials/<id>/spec.json
    return None


@pytest.mark.slow
@needs_proc
@pytest.mark.skipif(not RAY.is_file(), reason=f"no ray command beside {sys.executable}")
def test_search_on_two_node_cluster_survives_losing_a_node(tmp_path):
    data = generate_demo(tmp_path / "data", categories=["texture"], n_train=20, n_test_good=6, n_test_per_defect=2,
                         size=64)["texture"]
    temp_dir = Path(tempfile.mkdtemp(prefix="aad-ray-"))  # short: Ray's socket paths live under it
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in (RAY_CLUSTER_MODE_ENV, "RAY_ADDRESS")}
    # Ray's token authentication, with a token of this test's own (not the user's ~/.ray/auth_token)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               OMP_NUM_THREADS="1")
    common = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
    groups: list[int] = []
    search, search_log = None, (tmp_path / "search.log").open("w")
    try:
        head = _ray_start(["--head", "--port", str(port), "--temp-dir", str(temp_dir), "--include-dashboard", "false",
                           "--resources", '{"head_node": 1}', *common], env, tmp_path / "head.log", groups)
        worker = _ray_start(["--address", f"127.0.0.1:{port}", "--resources", '{"worker_node": 1}', *common], env,
                            tmp_path / "worker.log", groups)
        head_node, worker_node = _node_id(head), _node_id(worker)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        # autoencoder trials train until 70% of their 40 s limit: long enough to be caught running on the worker
        search = subprocess.Popen(
            [sys.executable, "-c", "import sys; from automl_ad.cli import main; sys.exit(main())", "search",
             str(data), "--families", "autoencoder", "--max-trials", "3", "--trial-timeout", "40", "--budget", "15m",
             "--address", f"127.0.0.1:{port}", "--tracking-uri", uri],
            cwd=tmp_path, env=env, stdout=search_log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline, lost = time.monotonic() + 300, None
        while lost is None and search.poll() is None and time.monotonic() < deadline:
            lost = _running_trial(worker)
            time.sleep(0.5)
        assert lost, f"no trial ran on the worker node: {(tmp_path / 'search.log').read_text()[-3000:]}"
        time.sleep(3)  # well into its training
        _kill(_group(worker))  # the whole worker node: raylet, its agents, Ray workers and the trial process
        assert search.wait(timeout=600) == 0, (tmp_path / "search.log").read_text()[-5000:]
    finally:
        if search is not None and search.poll() is None:
            _kill(_with_descendants({search.pid}))
            search.wait()
        for group in reversed(groups):
            _kill(_group(group))
        search_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    client = Tracker(uri).client
    experiments = [e.experiment_id for e in client.search_experiments() if e.name.startswith("automl-ad/")]
    runs = {r.data.tags["trial"]: r for r in client.search_runs(experiments,
                                                                 filter_string="tags.`automl_ad.kind` = 'trial'")}
    assert len(runs) == 3, sorted(runs)
    assert {r.data.tags.get("node_id") for r in runs.values()} == {head_node, worker_node}  # both nodes ran trials
    failed = runs[lost].data.tags
    assert failed["node_id"] == worker_node and failed["status"] == "failed"
    assert failed["failure_reason"] == "worker lost"
    assert worker_node in failed["error"] and "died" in failed["error"] and "Actor" in failed["error"]
    on_head = [r.data.tags for r in runs.values() if r.data.tags["node_id"] == head_node]
    assert on_head and all(t["status"] in ("ok", "stopped early") for t in on_head)  # the head carried on
    assert client.get_run(failed["automl_ad.search"]).info.status == "FINISHED"
