"""Ray: a local cluster that only this machine can reach (or a given one), how many trials it runs at once and with
which resources, the per-family ASHA scheduler, the stopper, and one trial run in a child process of a Ray worker."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from automl_ad.defaults import (
    DEFAULT_FALSE_ALARM_RATE,
    FEATURE_CACHE_ENV,
    SEARCH_NODE_LOSS_GRACE_S,
    SEARCH_REDUCTION_FACTOR,
    SEARCH_REPORT_EVERY,
)
from automl_ad.errors import UsageError
from automl_ad.folders import write_json_atomically
from automl_ad.search.trial import NODE_FILE, unreported_failure

if TYPE_CHECKING:
    from automl_ad.search.proposer import Proposer


def _die_with_parent() -> None:
    """Linux: the trial process is killed when the thread that started it ends (e.g. the trial was stopped)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_trial_process(config: dict, work_dir: str, data_file: str, metric: str, timeout_s: float,
                      threads: int, cache_dir: str, report) -> dict:
    """Run one configuration in a child process, relaying its intermediate quality to ``report``."""
    trial_id = config["trial_id"]
    out_dir = Path(work_dir) / "trials" / trial_id
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"family": config["family"], "params": config["params"], "data_file": data_file, "metric": metric,
            "timeout_s": timeout_s, "threads": threads, "out_dir": str(out_dir),
            "report_every": SEARCH_REPORT_EVERY, "trial_id": trial_id, "search": config.get("search"),
            "default": bool(config.get("default")), "rerun_of": config.get("rerun_of"),
            "fidelity": config.get("fidelity"), "false_alarm_rate": config.get("false_alarm_rate")}
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    parent = os.getppid()  # in a Ray worker: its node's raylet
    env = {**os.environ, FEATURE_CACHE_ENV: cache_dir, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    stderr = (out_dir / "stderr.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "automl_ad.search.trial", str(out_dir / "spec.json")],
                               stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                               preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    expired = threading.Event()

    def kill_after_limit() -> None:
        expired.set()
        process.kill()

    # iterative families check the limit every epoch; this hard limit also covers one long, non-iterative fit
    hard_limit_s = timeout_s * 1.2 + 60
    if config.get("search_ends_in_s") is not None:  # killed, and recorded, before the search ends
        hard_limit_s = max(1.0, min(hard_limit_s, float(config["search_ends_in_s"])))
    hard_limit = threading.Timer(hard_limit_s, kill_after_limit)
    hard_limit.start()
    final = None
    try:
        for line in process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "epoch" and event.get("quality") is not None:
                report({"epoch": event["epoch"], "quality": event["quality"], "loss": event["loss"],
                        "resource": resource(config.get("fidelity"), event["epoch"])})
            elif event.get("event") in ("result", "failed"):
                final = event
        process.wait()
    finally:
        hard_limit.cancel()
        if process.poll() is None:
            process.kill()
        stderr.close()
    if final is None:  # killed, or crashed before it could report its own error
        if process.returncode == -signal.SIGKILL and not expired.is_set() and _parent_gone(parent):
            os._exit(1)  # the whole node is being taken down: Ray records this worker as lost, not an OOM kill
        final = unreported_failure(process.returncode, (out_dir / "stderr.log").read_text(errors="replace"),
                                   hard_limit_s if expired.is_set() else None)
        final["error"] += f" (its output: {out_dir / 'stderr.log'})"
    if final["event"] == "failed":
        (out_dir / "failure.json").write_text(json.dumps(final))
        raise TrialFailed(f"{final['reason']}: {final['error']}")
    final.update(throughput=final["throughput_ips"], memory_mb=final["peak_rss_mb_score"],
                 resource=resource(config.get("fidelity"), final.get("epochs_trained")))
    return final


def _parent_gone(parent: int, grace_s: float = SEARCH_NODE_LOSS_GRACE_S) -> bool:
    """Whether this process's parent (a Ray worker's raylet) ends within ``grace_s``: its node is going down."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if os.getppid() != parent:
            return True
        time.sleep(0.05)
    return False


def resource(fidelity: dict | None, epoch: int | None) -> float:
    """Progress through the configuration's own full-fidelity schedule, in percent (the schedulers' time axis):
    its share of the training images × the share of its epochs done."""
    if not fidelity:
        return 100.0
    done = (epoch / fidelity["full_epochs"]) if fidelity.get("full_epochs") and epoch is not None else 1.0
    return 100.0 * fidelity["train_fraction"] * min(1.0, done)


class TrialFailed(RuntimeError):
    """A configuration failed; the search records it and goes on."""


def trainable_trial(config: dict, work_dir: str, data_file: str, metric: str, timeout_s: float, threads: int,
               cache_dir: str, search_id: str, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE):
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(work_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(trial_dir / NODE_FILE, {"node_id": ray.get_runtime_context().get_node_id(),
                                                  "host": socket.gethostname()})
    config = {**config, "trial_id": trial_id, "search": search_id, "false_alarm_rate": false_alarm_rate}
    if config.get("skip"):  # predicted not to finish, or not planned (see Proposer): recorded, never started
        record = skip_record(config)
        write_json_atomically(trial_dir / "failure.json", record)
        raise TrialFailed(f"{record['reason']}: {record['error']}")
    timeout_s = float(config.get("timeout_s") or timeout_s)
    result = run_trial_process(config, work_dir, data_file, metric, timeout_s, threads, cache_dir, tune.report)
    tune.report({k: v for k, v in result.items() if k not in ("event", "heatmaps")}
                | {"heatmaps": json.dumps(result.get("heatmaps", []))})


def skip_record(config: dict) -> dict:
    """The failure record of a configuration the proposer skips: ``not_started`` (the search shows it as not started,
    not as failed) unless the proposer skipped it because it failed itself."""
    reason = config.get("skip_reason", "predicted too slow")
    return {"event": "failed", "reason": reason, "error": config["skip"], "not_started": reason != "internal error"}


#: Ray's switch between its one-machine mode (every Ray server on 127.0.0.1) and its cluster mode (servers on the
#: machine's network address, for other nodes to reach); Ray reads it once, when it is first imported.
RAY_CLUSTER_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_ray(address: str | None) -> None:
    """Join the Ray cluster at ``address``, or start a local Ray that only this machine can reach.

    A local Ray binds its GCS, raylet, object manager, agents and workers to 127.0.0.1. Ray does so only in its
    one-machine mode (otherwise it turns a node address of 127.0.0.1 into the machine's network address and
    listens on all interfaces), so that mode is switched on before ray is imported.
    """
    if address is None:
        os.environ[RAY_CLUSTER_MODE_ENV] = "0"
    # a trial that fails as the search ends leaves its error unread; SearchCallback records it, so Ray need not
    # print its traceback on the console
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}} if address else None)
    node_ip = None if address else ray.util.get_node_ip_address()
    if node_ip is not None and not ipaddress.ip_address(node_ip).is_loopback:
        ray.shutdown()
        raise UsageError(f"a local Ray would listen on {node_ip}, reachable from the network: ray was imported "
                         f"before the search without {RAY_CLUSTER_MODE_ENV}=0. Set that variable before importing "
                         "ray, start Ray yourself (ray.init), or give a cluster --address")


def concurrency() -> tuple[int, dict, int]:
    """(parallel trials, resources per trial, threads per trial) from the CPUs and GPUs of the Ray nodes.

    Every trial gets the same threads, so latencies compare: up to 4, and no more than the smallest node has (per
    GPU on GPU nodes), so that a trial fits on every node; each node runs as many trials as it has room for.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
    if not nodes:
        raise UsageError("the Ray cluster has no live node with a CPU to run trials on; start one with "
                         "`ray start --address HEAD:PORT --num-cpus N`")
    gpu_nodes = [r for r in nodes if r.get("GPU", 0) >= 1]
    if gpu_nodes:
        threads = min([4] + [int(r["CPU"] // r["GPU"]) or 1 for r in gpu_nodes])
        resources = {"cpu": threads, "gpu": 1}
        return sum(_trials_on(r, resources) for r in gpu_nodes), resources, threads
    threads = min([4] + [int(r["CPU"]) for r in nodes])
    return sum(_trials_on(r, {"cpu": threads}) for r in nodes), {"cpu": threads}, threads


def _trials_on(node: dict, resources: dict) -> int:
    """Trials of ``resources`` (threads, and one GPU when given) a node's Ray resources run at once."""
    trials = int(node.get("CPU", 0)) // resources["cpu"]
    return min(trials, int(node.get("GPU", 0))) if resources.get("gpu") else trials


def memory_per_trial(resources: dict) -> float | None:
    """Bytes one trial may use: the least, over the Ray nodes, of the memory Ray gives tasks there (most of what was
    available when it started) shared by the trials the node runs at once; None when Ray reports none. A trial
    with a GPU keeps its largest arrays there (PatchCore's training patches, a training batch's activations), so
    it may use no more than the smallest GPU of this machine has either (:func:`smallest_gpu_bytes`; other
    nodes' GPUs are taken to be alike)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    shares = [node["memory"] / _trials_on(node, resources) for node in nodes
              if node.get("memory") and _trials_on(node, resources) >= 1]
    gpu = smallest_gpu_bytes() if resources.get("gpu") else None
    limits = ([min(shares)] if shares else []) + ([gpu] if gpu else [])
    return min(limits) if limits else None


def smallest_gpu_bytes() -> float | None:
    """Total memory of this machine's smallest NVIDIA GPU, read with ``nvidia-smi`` (which, unlike torch, opens no
    CUDA context in the search's own process: that would hold GPU memory for the whole search); None when it
    cannot be read."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=20, check=True).stdout
        mebibytes = [float(line) for line in listed.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(mebibytes) * 2 ** 20 if mebibytes else None


def family_scheduler():
    """ASHA per family on each trial's ``resource`` (percent of its own full-fidelity schedule): rungs at 1/η³,
    1/η², 1/η of every family's own epochs, so a family that rises slowly is compared only with itself."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    def make() -> ASHAScheduler:
        # stop_last_trials=False: a trial reporting its last epoch (resource 100) goes on to validate and report
        return ASHAScheduler(time_attr="resource", metric="quality", mode="max", max_t=100,
                             grace_period=100 / SEARCH_REDUCTION_FACTOR ** 3, reduction_factor=SEARCH_REDUCTION_FACTOR,
                             stop_last_trials=False)

    class FamilyASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.per_family: dict[str, ASHAScheduler] = {}

        def _of(self, trial) -> ASHAScheduler:
            family = trial.config.get("family", "")
            if family not in self.per_family:
                self.per_family[family] = make()
            return self.per_family[family]

        def set_search_properties(self, metric, mode, **spec) -> bool:
            return True

        def on_trial_add(self, tune_controller, trial):
            self._of(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self._of(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            self._of(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            self._of(trial).on_trial_remove(tune_controller, trial)

        def on_trial_error(self, tune_controller, trial):
            self._of(trial).on_trial_error(tune_controller, trial)

        def debug_string(self) -> str:
            return "; ".join(f"{f}: {s.debug_string()}" for f, s in self.per_family.items())

    return FamilyASHA()


def stop_when(proposer: Proposer):
    """A Tune stopper that ends the search once no family fits the remaining budget."""
    from ray import tune

    class NothingFits(tune.Stopper):
        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return proposer.exhausted

    return NothingFits()
