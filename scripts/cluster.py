#!/usr/bin/env python
"""A one-machine stand-in for the production stack, for tests and for trying the
cluster path without Docker: PostgreSQL, an MLflow tracking server on it (artifacts
served by the server), and a Ray cluster of several nodes.

    python scripts/cluster.py [--state-dir .cluster] up [--nodes 2] [--cpus-per-node 1]
    eval "$(python scripts/cluster.py env)"       # MLFLOW_TRACKING_URI, RAY_ADDRESS, ...
    python scripts/tune.py search_spaces/quick.yaml --smoke-test --address "$RAY_ADDRESS" \\
        --tracking-uri "$MLFLOW_TRACKING_URI" --storage "$SEG_CLUSTER_STORAGE"
    python scripts/cluster.py status
    python scripts/cluster.py down [--purge]

Every server listens on 127.0.0.1 only, on free ports. ``up`` writes what it started
(pids, ports, URIs, directories) to ``<state-dir>/state.json``; ``down`` stops exactly
those processes (never ``ray stop``, which would stop every Ray on the machine) and
deletes the throwaway runtime directory (PostgreSQL's data, Ray's session files).

Needs PostgreSQL's server binaries (Debian: ``apt-get install postgresql``). As root,
PostgreSQL runs as the ``postgres`` user (``$SEG_PG_USER`` to choose another).

Two things make a multi-node Ray stay on loopback (see ``loopback_ray_env``): Ray maps
127.0.0.1 to the machine's outward address on Linux, and with a token in ~/.ray (left
by any local ``ray.init()``) nodes would disagree on authentication. Clients of the
cluster need the variables that ``env`` prints.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATE_FILE = "state.json"
PG_SUPERUSER = "seg"
PG_DATABASE = "mlflow"


class ClusterError(RuntimeError):
    """A service did not start or stop; the message says which and where its log is."""


# --- small helpers ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` (Debian), else the one on PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if candidates:
        return candidates[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) for every live (non-zombie) process we can see."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z":  # a zombie is dead for our purposes (see pid_alive)
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def cluster_processes(pgids: list[int], marker: str | None = None) -> set[int]:
    """The processes in ``pgids``, those whose command line contains ``marker`` (a directory
    unique to this cluster, so no other Ray is touched), and all their descendants (Ray
    workers start process groups of their own)."""
    table = process_table()
    found = {pid for pid, (_, pgid) in table.items() if pgid in pgids and pid != os.getpid()}
    if marker:
        found |= {pid for pid in table if marker in cmdline(pid) and pid != os.getpid()}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child != os.getpid():
                found.add(child)
                stack.append(child)
    return found


def terminate(pids: set[int], grace: float = 5.0) -> set[int]:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds; returns the survivors."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.1)
        pids = {p for p in pids if pid_alive(p)}
        if not pids:
            break
    return pids


def wait_until(check, timeout: float, what: str, log: Path, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            raise ClusterError(f"{what} exited with code {process.returncode}; log {log}:\n{log_tail(log)}")
        time.sleep(0.25)
    raise ClusterError(f"{what} not ready after {timeout:.0f} s; log {log}:\n{log_tail(log)}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


# --- PostgreSQL ------------------------------------------------------------------------------

def postgres_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL runs as: None (ourselves) unless we are root, which initdb refuses."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("SEG_PG_USER")
    for candidate in ([name] if name else ["postgres", "nobody"]):
        try:
            return pwd.getpwnam(candidate)
        except KeyError:
            continue
    raise ClusterError(f"running as root, PostgreSQL needs a non-root user: no user {name or 'postgres'!r}; "
                       f"set SEG_PG_USER to an existing one")


def start_postgres(runtime: Path, logs: Path) -> dict:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise ClusterError("PostgreSQL's server binaries were not found (/usr/lib/postgresql/*/bin): "
                           "apt-get install -y postgresql, or run bash scripts/test.sh which installs it")
    user = postgres_user()
    data = runtime / "pg"
    data.mkdir(mode=0o700)
    password = secrets.token_urlsafe(24)
    pwfile = runtime / "pg-password"
    write_private(pwfile, password + "\n")
    as_user: dict = {}
    if user is not None:
        for path in (data, pwfile):
            os.chown(path, user.pw_uid, user.pw_gid)
        as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(data)}
    log = logs / "postgres.log"
    with open(log, "ab") as out:
        done = subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", PG_SUPERUSER, "--pwfile", str(pwfile),
                               "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"],
                              stdout=out, stderr=subprocess.STDOUT, cwd=data, env=env, timeout=120, **as_user)
    pwfile.unlink()
    if done.returncode != 0:
        raise ClusterError(f"initdb failed (code {done.returncode}); log {log}:\n{log_tail(log)}")
    port = free_port()
    # Loopback TCP only, no Unix socket (its default directory is not ours to write). The
    # data directory is thrown away by `down`, so durability settings are traded for speed.
    command = [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
               "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "synchronous_commit=off",
               "-c", "full_page_writes=off"]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=data, env=env, start_new_session=True, **as_user)
    client_env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "3"}
    ready = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
    info = {"pid": process.pid, "port": port, "data_dir": str(data), "bin_dir": str(bin_dir), "log": str(log),
            "user": user.pw_name if user else pwd.getpwuid(os.geteuid()).pw_name}
    try:
        wait_until(lambda: subprocess.run(ready, env=client_env).returncode == 0, 60, "PostgreSQL", log, process)
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_SUPERUSER,
                        PG_DATABASE], env=client_env, check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as error:
        stop_postgres(info)
        raise ClusterError(f"createdb failed: {error.stderr.decode(errors='replace')}") from None
    except ClusterError:
        stop_postgres(info)
        raise
    info["password"] = password  # state.json is private (0600), like the throwaway server
    info["uri"] = f"postgresql://{PG_SUPERUSER}:{password}@127.0.0.1:{port}/{PG_DATABASE}"  # libpq, psql
    return info


def stop_postgres(info: dict) -> bool:
    """Fast shutdown (SIGINT) of the postmaster we started; True when it is gone."""
    pid = info.get("pid")
    if not pid or not pid_alive(pid) or info["data_dir"] not in cmdline(pid):
        return True
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        return not terminate(cluster_processes([pid], info["data_dir"]))
    return True


# --- MLflow ----------------------------------------------------------------------------------

def start_mlflow(postgres: dict, state_dir: Path, logs: Path) -> dict:
    port = free_port()
    artifacts = state_dir / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = logs / "mlflow.log"
    # As in docker/compose.yaml: the password reaches libpq as PGPASSWORD, never in a URI or
    # argv; SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, and we ship psycopg2.
    env = {**os.environ, "PGPASSWORD": postgres["password"],
           "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://{PG_SUPERUSER}@127.0.0.1:{postgres['port']}/{PG_DATABASE}",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--serve-artifacts", "--artifacts-destination", str(artifacts)]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=state_dir, env=env, start_new_session=True)
    info = {"pid": process.pid, "port": port, "uri": f"http://127.0.0.1:{port}", "artifacts": str(artifacts),
            "log": str(log)}
    try:
        # The first start creates MLflow's tables in PostgreSQL: allow for it.
        wait_until(lambda: http_ok(f"{info['uri']}/health"), 180, "MLflow server", log, process)
    except ClusterError:
        stop_mlflow(info)
        raise
    return info


def stop_mlflow(info: dict) -> bool:
    pid = info.get("pid")
    if not pid:
        return True
    # Started in its own session: its group is the server and its uvicorn workers.
    return not terminate(cluster_processes([pid]))


# --- Ray -------------------------------------------------------------------------------------

def loopback_ray_env(token_path: Path) -> dict[str, str]:
    """What every process of the cluster, and every client of it, needs in its environment.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: on Linux Ray replaces 127.0.0.1 in an address by
    the machine's outward IP and then listens on all interfaces; with this it keeps
    127.0.0.1, and its gRPC servers bind to loopback only. The cluster uses token
    authentication with its own token, so a token in ~/.ray neither leaks in nor out.
    """
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path), "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true"}


def ray_client_available() -> bool:
    """Ray Client (ray://) needs grpcio, which is the ``ray[client]`` extra."""
    return importlib.util.find_spec("grpc") is not None


def start_ray_node(index: int, head: dict | None, args: argparse.Namespace, runtime: Path, logs: Path,
                   env: dict[str, str]) -> dict:
    temp_dir = runtime / f"ray{index}"
    temp_dir.mkdir()
    info: dict = {"index": index, "head": head is None, "temp_dir": str(temp_dir),
                  "log": str(logs / f"ray-node{index}.log")}
    # Ports that default to fixed numbers (6379, 10001, 8265, 52365) are chosen here, so that
    # another Ray on this machine cannot collide with ours; the rest Ray picks itself.
    command = [sys.executable, __file__, "_ray", "start", "--node-ip-address=127.0.0.1",
               f"--num-cpus={args.cpus_per_node}", "--num-gpus=0", f"--temp-dir={temp_dir}",
               f"--object-store-memory={args.object_store_mb * 1024 * 1024}", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}"]
    if head is None:
        gcs, dashboard = free_ports(2)
        command += ["--head", f"--port={gcs}", "--include-dashboard=false", f"--dashboard-port={dashboard}"]
        info.update(address=f"127.0.0.1:{gcs}")
        if ray_client_available():
            client = free_port()
            command.append(f"--ray-client-server-port={client}")
            info.update(client_address=f"ray://127.0.0.1:{client}")
    else:
        command.append(f"--address={head['address']}")
    log = Path(info["log"])
    with open(log, "ab") as out:
        # Its own session: `ray start` returns once its daemons run, and they keep its process
        # group, which is how `down` finds them. cwd is not the repo, as on a remote node.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=temp_dir, env=env, start_new_session=True)
    info["pgid"] = process.pid
    try:
        code = process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        terminate(cluster_processes([process.pid], str(temp_dir)))
        raise ClusterError(f"ray start (node {index}) {'timed out' if code is None else f'failed with code {code}'}; "
                           f"log {log}:\n{log_tail(log)}")
    return info


def ray_start_on_loopback(argv: list[str]) -> int:
    """``ray start`` that keeps 127.0.0.1 as the node and GCS address (see loopback_ray_env).

    With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray would also refuse to add a second node;
    the flag is read from a module constant, which is what is set back here, in this one
    process only.
    """
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_main

    services.resolve_ip_for_localhost = lambda host: host
    ray_constants.ENABLE_RAY_CLUSTER = True
    sys.argv = ["ray", *argv]
    return ray_main()


def wait_for_ray_nodes(address: str, count: int, env: dict[str, str], log: Path, timeout: float = 60) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")

    def enough() -> bool:
        done = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True,
                              timeout=60)
        return done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]

    wait_until(enough, timeout, f"Ray cluster with {count} nodes", log)


def stop_ray(nodes: list[dict]) -> set[int]:
    """Stops every process of these nodes (all at once: a throwaway cluster needs no
    orderly drain, and the GCS can take long to honour SIGTERM)."""
    # A dying raylet can still fork workers and agents: collect and stop again until none is left.
    survivors: set[int] = set()
    for _ in range(5):
        pids: set[int] = set()
        for node in nodes:
            pids |= cluster_processes([node["pgid"]], node["temp_dir"])
        if not pids:
            break
        survivors = terminate(pids)
        time.sleep(1.0)
    return survivors


# --- commands --------------------------------------------------------------------------------

def load_state(state_dir: Path) -> dict | None:
    path = state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def client_env(state: dict) -> dict[str, str]:
    """Variables for a driver or CLI that uses the cluster (printed by ``env``)."""
    ray = state["ray"]
    env = {**loopback_ray_env(Path(ray["token_path"])), "RAY_ADDRESS": ray["address"],
           "MLFLOW_TRACKING_URI": state["mlflow"]["uri"], "SEG_CLUSTER_STORAGE": state["storage"]}
    if ray.get("client_address"):
        env["SEG_CLUSTER_CLIENT_ADDRESS"] = ray["client_address"]
    return env


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = args.state_dir.absolute()
    old = load_state(state_dir)
    if old is not None:
        raise ClusterError(f"{state_dir / STATE_FILE} exists: a cluster is up (or was not taken down). "
                           f"Run: python scripts/cluster.py --state-dir {state_dir} down")
    if args.nodes < 1 or args.cpus_per_node < 0:
        raise ClusterError("--nodes must be >= 1 and --cpus-per-node >= 0")
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / ".gitignore").write_text("*\n")  # a state dir inside the repo stays out of git
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    storage = state_dir / "ray_results"
    storage.mkdir(exist_ok=True)
    # Short (Ray's socket paths must stay under 107 bytes) and traversable by the PostgreSQL user.
    runtime = Path(tempfile.mkdtemp(prefix="seg-cluster-", dir="/tmp"))
    runtime.chmod(0o711)
    token_path = state_dir / "ray_auth_token"
    write_private(token_path, secrets.token_hex(32))
    state: dict = {"state_dir": str(state_dir), "runtime_dir": str(runtime), "storage": str(storage),
                   "ray": {"token_path": str(token_path), "nodes": []}, "started": time.time()}

    def save() -> None:
        write_private(state_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")

    started = time.monotonic()
    try:
        state["postgres"] = start_postgres(runtime, logs)
        save()
        print(f"postgres  127.0.0.1:{state['postgres']['port']} ({time.monotonic() - started:.1f} s)", flush=True)
        state["mlflow"] = start_mlflow(state["postgres"], state_dir, logs)
        save()
        print(f"mlflow    {state['mlflow']['uri']} ({time.monotonic() - started:.1f} s)", flush=True)
        env = {**os.environ, **loopback_ray_env(token_path)}
        # Trials must get the tracking URI from the search, not from the node's environment.
        for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
            env.pop(name, None)
        head = None
        for index in range(args.nodes):
            node = start_ray_node(index, head, args, runtime, logs, env)
            state["ray"]["nodes"].append(node)
            save()
            if head is None:
                head = node
                state["ray"].update(address=node["address"], client_address=node.get("client_address"))
        wait_for_ray_nodes(head["address"], args.nodes, {**env, "RAY_ADDRESS": head["address"]},
                           Path(head["log"]))
        print(f"ray       {head['address']} {args.nodes} node(s) x {args.cpus_per_node} CPU "
              f"({time.monotonic() - started:.1f} s)", flush=True)
    except BaseException:
        save()
        take_down(state, keep_runtime=args.keep_runtime)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        print(f"up failed; logs in {logs}" + (f" and {runtime}" if args.keep_runtime else ""), file=sys.stderr)
        raise
    write_private(state_dir / "env.sh", "".join(f"export {k}={v}\n" for k, v in client_env(state).items()))
    save()
    where = "" if state_dir == default_state_dir().absolute() else f" --state-dir {state_dir}"
    print(f"state in {state_dir / STATE_FILE}; client variables: eval \"$(python scripts/cluster.py{where} env)\"")
    return 0


def take_down(state: dict, keep_runtime: bool = False) -> list[str]:
    """Stops everything ``state`` records, in reverse order; returns what would not stop."""
    problems = []
    survivors = stop_ray(state.get("ray", {}).get("nodes", []))
    if survivors:
        problems.append(f"Ray processes still alive: {sorted(survivors)}")
    if "mlflow" in state and not stop_mlflow(state["mlflow"]):
        problems.append(f"MLflow server (pid {state['mlflow']['pid']}) still alive")
    if "postgres" in state and not stop_postgres(state["postgres"]):
        problems.append(f"PostgreSQL (pid {state['postgres']['pid']}) still alive")
    runtime = state.get("runtime_dir")
    if runtime and not problems:
        # Last sweep over everything that carries this cluster's directory on its command line
        # (Ray's agents and client server can outlive their raylet by a minute).
        groups = [state[key]["pid"] for key in ("postgres", "mlflow") if key in state]
        groups += [node["pgid"] for node in state.get("ray", {}).get("nodes", [])]
        left = terminate(cluster_processes(groups, runtime))
        if left:
            problems.append(f"processes still alive: {sorted(left)}")
    if runtime and not keep_runtime and not problems:
        shutil.rmtree(runtime, ignore_errors=True)
    return problems


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = args.state_dir.absolute()
    state = load_state(state_dir)
    if state is None:
        print(f"no cluster recorded in {state_dir / STATE_FILE}: nothing to stop")
        return 0
    problems = take_down(state, keep_runtime=args.keep_runtime)
    if problems:
        raise ClusterError("; ".join(problems))
    (state_dir / STATE_FILE).unlink()
    (state_dir / "env.sh").unlink(missing_ok=True)
    Path(state["ray"]["token_path"]).unlink(missing_ok=True)
    if args.purge:
        shutil.rmtree(state_dir, ignore_errors=True)
    print("down" + (f" (runtime files kept in {state['runtime_dir']})" if args.keep_runtime else ""))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = load_state(args.state_dir.absolute())
    if state is None:
        print(f"down (no {args.state_dir / STATE_FILE})")
        return 3
    healthy = True
    pg = state["postgres"]
    ready = subprocess.run([f"{pg['bin_dir']}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(pg["port"])])
    healthy &= ready.returncode == 0
    print(f"postgres  127.0.0.1:{pg['port']} pid {pg['pid']}: {'up' if ready.returncode == 0 else 'DOWN'}")
    mlflow_up = http_ok(f"{state['mlflow']['uri']}/health")
    healthy &= mlflow_up
    print(f"mlflow    {state['mlflow']['uri']} pid {state['mlflow']['pid']}: {'up' if mlflow_up else 'DOWN'}")
    env = {**os.environ, **client_env(state)}
    try:
        done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status", "--address",
                               state["ray"]["address"]], env=env, capture_output=True, text=True, timeout=60)
        ray_up, report = done.returncode == 0, done.stdout if done.returncode == 0 else done.stderr[-2000:]
    except subprocess.TimeoutExpired:
        ray_up, report = False, "ray status did not answer within 60 s"
    healthy &= ray_up
    print(f"ray       {state['ray']['address']}: {'up' if ray_up else 'DOWN'}")
    print("\n".join("  " + line for line in report.splitlines() if line.strip()))
    return 0 if healthy else 1


def cmd_env(args: argparse.Namespace) -> int:
    state = load_state(args.state_dir.absolute())
    if state is None:
        raise ClusterError(f"no cluster recorded in {args.state_dir / STATE_FILE}: run `up` first")
    if args.json:
        print(json.dumps(client_env(state)))
    else:
        for key, value in client_env(state).items():
            print(f"export {key}={value}")
    return 0


def default_state_dir() -> Path:
    return Path(os.environ.get("SEG_CLUSTER_STATE", REPO / ".cluster"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=default_state_dir(),
                        help="where state.json, logs, artifacts and Ray storage go (default: <repo>/.cluster, "
                             "or $SEG_CLUSTER_STATE)")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start PostgreSQL, MLflow and a Ray cluster")
    up.add_argument("--nodes", type=int, default=2, help="Ray nodes, the head included (default 2)")
    up.add_argument("--cpus-per-node", type=int, default=1, help="CPUs each Ray node offers (default 1)")
    up.add_argument("--object-store-mb", type=int, default=256, help="object store of each Ray node")
    up.add_argument("--keep-runtime", action="store_true", help="if up fails, keep PostgreSQL's data and Ray's "
                                                               "session files in /tmp for a look")
    down = commands.add_parser("down", help="stop what `up` started")
    down.add_argument("--keep-runtime", action="store_true", help="keep PostgreSQL's data and Ray's logs in /tmp")
    down.add_argument("--purge", action="store_true", help="also delete the state directory")
    commands.add_parser("status", help="health of each service; exit 0 when all are up")
    env = commands.add_parser("env", help="print `export` lines for clients of the cluster")
    env.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ray"]:  # internal, how start_ray_node runs `ray start`
        return ray_start_on_loopback(argv[1:])
    args = parse_args(argv)
    try:
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status, "env": cmd_env}[args.command](args)
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
