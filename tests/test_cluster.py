"""The cluster path on one machine, with real services.

``scripts/cluster.py up`` starts PostgreSQL, an MLflow server on it (artifacts served by
the server) and a two-node Ray cluster, all on 127.0.0.1; a search then runs through
``scripts/tune.py --address --tracking-uri --storage`` and every run it makes must land
in PostgreSQL, none left RUNNING. ``down`` must leave no process behind.

The compose file is checked with ``docker compose config`` where the compose plugin is
installed (it parses only: no Docker daemon is needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import LR, REPO, SCRIPTS, decode_address, listening_sockets, load_script, shared_tmp_path, tiny_space

CLUSTER_SCRIPT = SCRIPTS / "cluster.py"
DOCKER = REPO / "docker"
cluster_script = load_script("cluster")

needs_postgres = pytest.mark.skipif(
    cluster_script.postgres_bin_dir() is None,
    reason="PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin): apt-get install -y postgresql, "
           "or run bash scripts/test.sh, which installs it")


def run_cluster(state_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class Cluster:
    state_dir: Path
    state: dict
    env: dict  # os.environ plus what `cluster.py env` prints

    @property
    def nodes(self) -> list[dict]:
        return self.state["ray"]["nodes"]

    def all_pids(self) -> set[int]:
        groups = [self.state["postgres"]["pid"], self.state["mlflow"]["pid"], *(n["pgid"] for n in self.nodes)]
        return cluster_script.cluster_processes(groups, self.state["runtime_dir"])

    def query(self, sql: str, *params) -> list[tuple]:
        import psycopg2

        connection = psycopg2.connect(self.state["postgres"]["uri"])
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            connection.close()

    def node_of_pid(self, pid: int) -> int | None:
        """Which node's Ray worker had this pid (Ray names worker logs after the pid)."""
        for node in self.nodes:
            if any(Path(node["temp_dir"]).glob(f"session_*/logs/worker-*-{pid}.out")):
                return node["index"]
        return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    with shared_tmp_path(request, tmp_path_factory, "cluster") as state_dir:  # the searches' checkpoints too
        try:
            up = run_cluster(state_dir, "up", "--nodes", "2", "--cpus-per-node", "1", timeout=400)
            assert up.returncode == 0, f"cluster.py up failed:\n{up.stdout}\n{up.stderr}"
            state = json.loads((state_dir / "state.json").read_text())
            printed = run_cluster(state_dir, "env", "--json")
            assert printed.returncode == 0, printed.stderr
            yield Cluster(state_dir, state, {**os.environ, **json.loads(printed.stdout)})
        finally:
            recorded = state_dir / "state.json"
            state = json.loads(recorded.read_text()) if recorded.is_file() else None
            down = run_cluster(state_dir, "down", timeout=180)
            assert down.returncode == 0, f"cluster.py down failed:\n{down.stdout}\n{down.stderr}"
            if state is not None:
                left = Cluster(state_dir, state, {}).all_pids()
                assert not left, f"processes left running after down: {sorted(left)}"
                assert not Path(state["runtime_dir"]).exists()


@needs_postgres
@pytest.mark.services
def test_services_are_up_on_loopback_only(cluster: Cluster) -> None:
    status = run_cluster(cluster.state_dir, "status", timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert len(cluster.nodes) == 2 and cluster.nodes[0]["head"] and not cluster.nodes[1]["head"]
    listening = listening_sockets(cluster.all_pids())
    assert listening, "found no listening socket of the cluster's processes"
    assert all(address in ("127.0.0.1", "::ffff:127.0.0.1") for _, address, _ in listening), listening
    # PostgreSQL runs as a non-root user even when the tests run as root.
    owner = Path(f"/proc/{cluster.state['postgres']['pid']}").stat().st_uid
    assert os.geteuid() != 0 or owner != 0


DRIVER = """
import os, sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
alive = [node for node in ray.nodes() if node["Alive"]]
second = [node for node in alive if "node:__internal_head__" not in node["Resources"]]
assert len(alive) == 2 and len(second) == 1, alive

@ray.remote(num_cpus=1)
def log_run(tracking_uri):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("from-a-ray-task"))
    client.log_metric(run.info.run_id, "answer", 42.0)
    client.log_text(run.info.run_id, "logged from the second node", "note.txt")
    client.set_terminated(run.info.run_id)
    return run.info.run_id, ray.get_runtime_context().get_node_id(), os.getpid()

strategy = NodeAffinitySchedulingStrategy(second[0]["NodeID"], soft=False)
run_id, node_id, pid = ray.get(log_run.options(scheduling_strategy=strategy).remote(sys.argv[1]))
assert node_id == second[0]["NodeID"]
print(run_id, pid)
"""


@needs_postgres
@pytest.mark.services
def test_a_ray_task_on_the_second_node_logs_to_the_server(cluster: Cluster, tmp_path: Path) -> None:
    uri = cluster.state["mlflow"]["uri"]
    done = subprocess.run([sys.executable, "-c", DRIVER, uri], env=cluster.env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id, pid = done.stdout.split()[-2:]
    assert cluster.node_of_pid(int(pid)) == 1
    assert cluster.query("SELECT status FROM runs WHERE run_uuid = %s", run_id) == [("FINISHED",)]
    assert cluster.query("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'answer'", run_id) == [(42.0,)]
    # The artifact went through the server (mlflow-artifacts:) into its artifact store.
    (note,) = Path(cluster.state["mlflow"]["artifacts"]).glob(f"*/{run_id}/artifacts/note.txt")
    assert note.read_text() == "logged from the second node"


def run_search_on_cluster(cluster: Cluster, synthetic_root: Path, tmp_path: Path, name: str,
                          address: str) -> tuple[subprocess.CompletedProcess, Path]:
    space = tmp_path / f"{name}.yaml"
    space.write_text(tiny_space(None, name=name, description="four tiny trials on a two-node Ray cluster", space=LR,
                                budget={"trials": 4, "max_epochs": 2, "concurrency": 2, "cpus_per_trial": 1,
                                        "seed": 0, "startup_trials": 4, "grace_period": 2, "max_failures": 0}))
    # data.root is relative to the driver's cwd: the search must hand trials (whose cwd
    # is a Ray session directory) an absolute path.
    command = [sys.executable, str(SCRIPTS / "tune.py"), str(space), "--address", address,
               "--tracking-uri", cluster.state["mlflow"]["uri"], "--storage", cluster.state["storage"],
               "--name", name, "--set", f"data.root={synthetic_root.name}", "--quiet"]
    done = subprocess.run(command, env=cluster.env, cwd=synthetic_root.parent, capture_output=True, text=True,
                          timeout=420)
    return done, Path(cluster.state["storage"]) / name


def check_search(cluster: Cluster, done: subprocess.CompletedProcess, search_dir: Path, name: str,
                 both_nodes: bool = True) -> dict:
    from mlflow import MlflowClient

    output = done.stdout[-6000:] + done.stderr[-6000:]
    assert done.returncode == 0, output
    summary = json.loads((search_dir / "summary.json").read_text())
    assert not summary["interrupted"], output
    assert len(summary["trials"]) == 4 and all(t["state"] == "completed" for t in summary["trials"]), summary

    client = MlflowClient(cluster.state["mlflow"]["uri"])
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name!r} on the tracking server"
    found = client.search_runs([experiment.experiment_id])
    parent = summary["parent_run_id"]
    children = [run for run in found if run.data.tags.get("mlflow.parentRunId") == parent]
    assert {run.info.run_id for run in children} == {t["run_id"] for t in summary["trials"]}
    assert {run.info.run_id for run in found} == {parent} | {run.info.run_id for run in children}
    assert all(run.data.metrics.get("val_miou") is not None for run in children)

    # The same runs, read from PostgreSQL itself: all there, none left RUNNING.
    rows = dict(cluster.query("SELECT run_uuid, status FROM runs WHERE experiment_id = %s",
                              int(experiment.experiment_id)))
    assert set(rows) == {run.info.run_id for run in found}
    assert set(rows.values()) == {"FINISHED"}, rows

    # Checkpoints live in the shared storage, and the trials ran on both nodes.
    assert list(search_dir.glob("*/checkpoint_*")), sorted(p.name for p in search_dir.iterdir())
    for trial in summary["trials"]:
        assert trial["checkpoint"] and Path(trial["checkpoint"]).is_file()
        assert Path(trial["checkpoint"]).is_relative_to(search_dir)
    pids = [json.loads(path.read_text().splitlines()[-1])["pid"] for path in search_dir.glob("*/result.json")]
    nodes = {cluster.node_of_pid(pid) for pid in pids}
    assert nodes == {0, 1} if both_nodes else nodes <= {0, 1}, pids
    return summary


@needs_postgres
@pytest.mark.services
def test_search_on_the_cluster_tracks_every_trial_in_postgres(cluster: Cluster, synthetic_root: Path,
                                                              tmp_path: Path) -> None:
    done, search_dir = run_search_on_cluster(cluster, synthetic_root, tmp_path, "cluster-search",
                                             cluster.state["ray"]["address"])
    check_search(cluster, done, search_dir, "cluster-search")


@needs_postgres
@pytest.mark.services
def test_search_through_ray_client(cluster: Cluster, synthetic_root: Path, tmp_path: Path) -> None:
    address = cluster.state["ray"].get("client_address")
    if not address:
        pytest.skip("Ray Client needs grpcio (pip install 'ray[client]'), so the head has no ray:// server")
    done, search_dir = run_search_on_cluster(cluster, synthetic_root, tmp_path, "cluster-client", address)
    # Under Ray Client a finished trial's worker process may take the next trial, so both
    # trials can land on one node: only the tracking and storage checks apply.
    check_search(cluster, done, search_dir, "cluster-client", both_nodes=False)


# --- the script without services ----------------------------------------------------------------

def test_cluster_script_without_a_cluster(tmp_path: Path) -> None:
    status = run_cluster(tmp_path, "status")
    assert status.returncode == 3 and "down" in status.stdout
    down = run_cluster(tmp_path, "down")
    assert down.returncode == 0 and "nothing to stop" in down.stdout
    env = run_cluster(tmp_path, "env")
    assert env.returncode == 1 and "run `up` first" in env.stderr


@pytest.mark.parametrize("address, failures, connects", [
    ("ray://127.0.0.1:10001", 2, True),  # the client server's start failed twice: the third try connects
    ("ray://127.0.0.1:10001", 3, False),  # every try failed: the last error is raised
    ("auto", 1, False),  # not Ray Client: nothing to retry
])
def test_ray_client_server_start_failures_are_retried(monkeypatch: pytest.MonkeyPatch, address: str,
                                                      failures: int, connects: bool) -> None:
    import ray

    from seg.tuning import search

    calls, shutdowns = [], []

    def init(**kwargs) -> None:
        calls.append(kwargs["address"])
        if len(calls) <= failures:
            raise ConnectionAbortedError("Initialization failure from server:\nRuntimeError: Starting Ray client "
                                         "server failed. See ray_client_server_23000.err for detailed logs.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(search.time, "sleep", lambda seconds: None)
    if connects:
        assert search.start_ray(address=address) is True
        assert len(calls) == failures + 1 and len(shutdowns) == failures
    else:
        with pytest.raises(ConnectionAbortedError, match="Starting Ray client server failed"):
            search.start_ray(address=address)
        assert len(calls) == min(failures, search.CLIENT_CONNECT_ATTEMPTS)


def test_decode_proc_net_addresses() -> None:
    assert decode_address("0100007F") == "127.0.0.1"
    assert decode_address("0000000000000000FFFF00000100007F") == "::ffff:127.0.0.1"
    assert decode_address("00000000") == "0.0.0.0"


# --- Docker files ----------------------------------------------------------------------------------

def compose_command() -> list[str] | None:
    """``docker compose`` (the v2 plugin) or a v2 ``docker-compose`` binary, if installed."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        try:
            done = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip().lstrip("v").startswith(("2", "3")):
            return command
    return None


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    command = compose_command()
    if command is None:
        pytest.skip("Docker Compose v2 is not installed (docker compose plugin or docker-compose v2): "
                    "`docker compose config` cannot be checked")
    # A copy, so that the test writes no .env into the checkout.
    copy = tmp_path_factory.mktemp("compose")
    shutil.copytree(DOCKER, copy / "docker")
    shutil.copy(DOCKER / ".env.example", copy / "docker" / ".env")
    done = subprocess.run([*command, "-f", str(copy / "docker" / "compose.yaml"), "--profile", "gpu",
                           "--profile", "cpu", "--profile", "tune", "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, cwd=copy / "docker",
                          env={k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_CONFIG")})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compose_publishes_only_the_ui_ports_on_loopback(compose_config: dict) -> None:
    published = {(name, port.get("host_ip"), port.get("published"), port.get("target"))
                 for name, service in compose_config["services"].items() for port in service.get("ports", [])}
    assert published == {("mlflow", "127.0.0.1", "5000", 5000), ("ray-head", "127.0.0.1", "8265", 8265)}


def test_compose_services_wait_for_healthy_dependencies(compose_config: dict) -> None:
    services = compose_config["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker-gpu", "ray-worker-cpu", "tune"} <= set(services)
    for name in ("postgres", "mlflow", "ray-head"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] == "service_healthy", (name, dependency)
    assert set(services["mlflow"]["depends_on"]) == {"postgres"}
    assert set(services["tune"]["depends_on"]) == {"mlflow", "ray-head"}


def test_compose_gpu_workers_reserve_gpus(compose_config: dict) -> None:
    devices = compose_config["services"]["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    assert "deploy" not in compose_config["services"]["ray-worker-cpu"] or not (
        compose_config["services"]["ray-worker-cpu"]["deploy"].get("resources", {}).get("reservations", {})
        .get("devices"))


def test_compose_shares_storage_and_keeps_secrets_in_the_env_file(compose_config: dict) -> None:
    services = compose_config["services"]

    def mounts(name: str) -> dict[str, str]:
        return {volume["target"]: volume["source"] for volume in services[name].get("volumes", [])}

    # Every node and the driver see the same data, Ray storage; MLflow owns the artifacts.
    ray_services = ("ray-head", "ray-worker-gpu", "ray-worker-cpu", "tune")
    for target in ("/app/data", "/shared/ray_results"):
        assert len({mounts(name).get(target) for name in ray_services} - {None}) == 1, target
        assert all(target in mounts(name) for name in ray_services), target
    assert "/shared/mlartifacts" in mounts("mlflow")
    text = (DOCKER / "compose.yaml").read_text()
    example = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    assert "POSTGRES_PASSWORD" in example
    assert example["POSTGRES_PASSWORD"] not in text  # the password lives in .env only
    for name in ("postgres", "mlflow"):
        assert services[name]["environment"].get("POSTGRES_PASSWORD") == example["POSTGRES_PASSWORD"]


def test_env_file_is_ignored_and_its_example_is_not() -> None:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"
    example = subprocess.run(["git", "check-ignore", "-q", "docker/.env.example"], cwd=REPO)
    assert example.returncode == 1, "docker/.env.example must not be ignored"


def test_image_runs_as_a_user_without_pip_cache_and_ignores_local_state() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "PIP_NO_CACHE_DIR=1" in dockerfile
    assert "pip install --no-deps -e ." in dockerfile
    # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile, for a build from the repo root.
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for entry in (".venv", ".git", "data", "mlflow.db", "ray_results", ".cluster", "docker/.env"):
        assert any(line.strip("/*") == entry.strip("/*") for line in ignored), entry
