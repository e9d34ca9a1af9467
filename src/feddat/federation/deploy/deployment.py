"""A Flower deployment on one machine: a SuperLink and one SuperNode per client, each its own process.

`feddat deploy` (and `Deployment` from Python) does what an operator types on separate machines
(docs/deployment.md), on loopback ports chosen at run time:

1. makes a certificate authority and the SuperLink's TLS certificate (`tls/`), and one OpenSSH EC key pair per
   SuperNode (`keys/`);
2. starts `flower-superlink` with TLS and SuperNode authentication (`--enable-supernode-auth`);
3. registers every SuperNode's public key with `flwr supernode register`;
4. starts one `flower-supernode` per client, each with its own node config (`nodes/<i>/node-config.toml`:
   `client-id = i`, or with client folders `data = <its folder>` and `out = nodes/<i>/out`; its own
   `client-state-dir` and `cache-dir`, as on a machine of its own), its private key and the CA certificate;
5. runs FedDAT with `flwr run <app> deployment --run-config <toml> --stream`, showing the streamed log;
6. stops every process it started (and the processes those started), also on Ctrl-C, SIGTERM, an error or a
   timeout; with Linux, they also get SIGTERM if the process driving the deployment dies.

The TLS material is made by feddat.federation.deploy.certificates, the processes started and stopped by
feddat.federation.deploy.processes.

Layout of the work directory:

    tls/        ca.pem, ca.key, superlink.pem, superlink.key
    keys/       supernode-<i>, supernode-<i>.pub
    flwr-home/  config.toml (the `deployment` SuperLink connection of flwr run / flwr supernode), apps/
    nodes/<i>/  node-config.toml, client-state/, cache/, out/ (with client folders: the node's model and scores)
    logs/       superlink.log, supernode-<i>.log, flwr.log (registrations), run.log
    out/        results.json, clients/ (not with client folders), checkpoint/, received.jsonl (the ServerApp's)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from feddat.config import RunConfig, normalise, parse_pairs
from feddat.errors import FedDATError
from feddat.federation.deploy.certificates import LOOPBACK, TLSFiles, write_node_key, write_tls_files
from feddat.federation.deploy.processes import (Identity, Process, Spawner, die_with_parent, process_family,
                                                stop_processes)

CONNECTION = "deployment"          # the SuperLink connection's name in flwr-home/config.toml
START_TIMEOUT_S = 60.0             # for the SuperLink to accept connections
NODE_ID_LINE = "SuperNode ID"      # what flower-supernode logs once the SuperLink accepted it
REGISTERED = "registered"          # start_supernode's default key: the one registered for that node


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it), so parallel deployments do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def toml_text(values: Mapping[str, Any]) -> str:
    """Flat key = value lines (strings, booleans, integers, floats), as flwr reads a run or node config file."""
    import tomli_w

    for k, v in values.items():
        if not isinstance(v, (str, bool, int, float)):
            raise FedDATError(f"config value {k}={v!r} must be a string, boolean or number")
    return tomli_w.dumps(dict(values))


@dataclass
class Deployment:
    """A SuperLink and `clients` SuperNodes on this machine; use as a context manager (stops everything on exit).

    tls: the SuperLink serves TLS with a certificate of a CA made here; SuperNodes and flwr trust that CA.
    auth: SuperNode authentication (needs tls): only SuperNodes whose public key was registered connect.
    node_config: extra node-config values for every SuperNode (e.g. device, threads, model-path).
    client_data: one client folder per SuperNode (then `clients` is their number): each node opens only its own
        (node config `data`, named by the folder, saving its model under `nodes/<i>/out/`), and the run sets
        `nodes` so that the server holds no data; empty: the nodes serve the run config's clients by index.
    echo: where progress lines and the streamed run log go (None: only to the log files).
    """

    workdir: Path
    clients: int = 0
    tls: bool = True
    auth: bool = True
    node_config: dict[str, Any] = field(default_factory=dict)
    client_data: list[Path] = field(default_factory=list)
    app_dir: Path | None = None
    echo: Callable[[str], None] | None = print
    processes: list[Process] = field(default_factory=list, init=False)
    nodes: dict[int, Process] = field(default_factory=dict, init=False)
    port: int = field(default=0, init=False)

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        if self.client_data:
            self.client_data = [Path(p).expanduser().resolve() for p in self.client_data]
            missing = [str(p) for p in self.client_data if not p.exists()]
            if missing:
                raise FedDATError(f"no such client folder: {', '.join(missing)}")
            names = [p.name for p in self.client_data]
            if len(set(names)) != len(names):
                raise FedDATError(f"two client folders have one name ({', '.join(names)}): each SuperNode's client is "
                                  "named by its folder")
            if self.clients not in (0, len(self.client_data)):
                raise FedDATError(f"{self.clients} clients but {len(self.client_data)} client folders")
            self.clients = len(self.client_data)
        if not isinstance(self.clients, int) or isinstance(self.clients, bool) or self.clients < 1:
            raise FedDATError(f"a deployment needs a positive number of clients, got {self.clients!r}")
        if self.auth and not self.tls:
            raise FedDATError("SuperNode authentication needs TLS: drop --insecure, or add --no-auth")
        self.app_dir = Path(self.app_dir).resolve() if self.app_dir else find_app_dir()
        self.bin = Path(sys.executable).parent
        self.logs = self.workdir / "logs"
        self.home = self.workdir / "flwr-home"
        self.out = self.workdir / "out"
        self.tls_files: TLSFiles | None = None
        self._spawner: Spawner | None = None
        self.stopped: set[Identity] = set()   # every process stop() stopped

    # -- lifecycle --
    def __enter__(self) -> "Deployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Files, the SuperLink, the key registrations and every SuperNode."""
        for d in (self.logs, self.home):
            d.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.tls_files = write_tls_files(self.workdir / "tls")
        for attempt in range(3):  # another process may take the free port before the SuperLink binds it
            self.port = free_port()
            self._write_connection()
            try:
                self.start_superlink()
                break
            except FedDATError as e:
                if "address already in use" not in str(e).lower() or attempt == 2:
                    raise
        if self.auth:
            self.register([write_node_key(self.node_key(i)) for i in range(self.clients)])
        nodes = [self.start_supernode(i) for i in range(self.clients)]
        for proc in nodes:
            self.wait_connected(proc, strict=False)

    def stop(self) -> None:
        if self.processes:
            self._say(f"stopping {len(self.processes)} process(es) and the processes they started")
        self.stopped |= stop_processes(self.processes)
        self.processes.clear()
        if self._spawner is not None:
            self._spawner.close()
            self._spawner = None

    # -- environment and files --
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLWR_HOME=str(self.home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                   FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
                   PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}")
        return env

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def node_key(self, index: int) -> Path:
        return self.workdir / "keys" / f"supernode-{index}"

    def node_dir(self, index: int) -> Path:
        return self.workdir / "nodes" / str(index)

    def _write_connection(self) -> None:
        conn: dict[str, Any] = {"address": self.address}
        if self.tls_files is not None:
            conn["root-certificates"] = str(self.tls_files.ca)
        else:
            conn["insecure"] = True
        import tomli_w

        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                                           CONNECTION: conn}}))

    def _tls_client_args(self) -> list[str]:
        return ["--root-certificates", str(self.tls_files.ca)] if self.tls_files else ["--insecure"]

    # -- processes --
    def _say(self, line: str) -> None:
        if self.echo is not None:
            self.echo(f"[deploy] {line}")

    def spawn(self, name: str, argv: list[str], log: Path | None = None) -> Process:
        """Start `argv` in its own session, output to `log` (default logs/<name>.log). Processes are started by
        one thread that lives as long as the deployment, because Linux sends the parent-death signal when the
        starting *thread* ends: so any thread may call this."""
        log = log or self.logs / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        if self._spawner is None:
            self._spawner = Spawner()
        popen = self._spawner.call(lambda: self._popen(argv, log))
        proc = Process(name, popen, log, offset)
        self.processes.append(proc)
        return proc

    def _popen(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                    cwd=self.workdir, start_new_session=True,
                                    preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)

    def _exe(self, name: str) -> str:
        path = self.bin / name
        if not path.exists():
            raise FedDATError(f"{name} is not installed next to {sys.executable}: install flwr (pip install flwr)")
        return str(path)

    def start_superlink(self) -> Process:
        argv = [self._exe("flower-superlink"), "--host", LOOPBACK, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.tls_files is not None:
            argv += ["--ssl-ca-certfile", str(self.tls_files.ca), "--ssl-certfile", str(self.tls_files.cert),
                     "--ssl-keyfile", str(self.tls_files.key)]
        else:
            argv += ["--insecure"]
        if self.auth:
            argv += ["--enable-supernode-auth"]
        link = self.spawn("superlink", argv)
        self._say(f"SuperLink on {self.address} (TLS {'on' if self.tls else 'off'}, SuperNode authentication "
                  f"{'on' if self.auth else 'off'}), pid {link.pid}, log {link.log}")
        end = time.time() + START_TIMEOUT_S
        while time.time() < end:
            if not link.running():
                raise FedDATError(f"the SuperLink exited with code {link.popen.returncode}:\n{link.tail()}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1):
                    pass
            except OSError:
                time.sleep(0.2)
                continue
            time.sleep(0.5)
            if link.running():
                return link
        raise FedDATError(f"the SuperLink did not accept connections on {self.address} within "
                          f"{START_TIMEOUT_S:.0f} s:\n{link.tail()}")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """A `flwr` CLI command against this deployment's SuperLink (its output also goes to logs/flwr.log)."""
        res = subprocess.run([self._exe("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                             text=True, timeout=timeout)
        with open(self.logs / "flwr.log", "a") as f:
            f.write(f"$ flwr {' '.join(args)}\n{res.stdout}{res.stderr}\n")
        return res

    def register(self, public_keys: list[Path]) -> None:
        """`flwr supernode register` for each public key (what the federation's operator does once per node)."""
        for i, key in enumerate(public_keys):
            res = self.flwr("supernode", "register", str(key), CONNECTION)
            if res.returncode != 0:
                raise FedDATError(f"registering {key} failed:\n{res.stdout}{res.stderr}")
            self._say(f"registered the public key of SuperNode {i} ({key.name})")

    def supernode_argv(self, index: int, key: Path | str | None = REGISTERED,
                       root_certificates: Path | None = None) -> list[str]:
        """flower-supernode's command line for client `index`: `key` is its private key (by default the one
        registered for it; None: no key), `root_certificates` the CA it trusts (by default the deployment's)."""
        node = self.node_dir(index)
        node.mkdir(parents=True, exist_ok=True)
        config = {"client-state-dir": str(node / "client-state"), "cache-dir": str(node / "cache"), **self.node_config}
        if self.client_data:  # the node's own data, and where it keeps its model
            config.update(data=str(self.client_data[index]), out=str(node / "out"))
        else:
            config["client-id"] = index
        (node / "node-config.toml").write_text(toml_text(config))
        argv = [self._exe("flower-supernode"), "--superlink", self.address, "--host", LOOPBACK,
                "--port", str(free_port()), "--node-config", str(node / "node-config.toml")]
        if root_certificates is not None:
            argv += ["--root-certificates", str(root_certificates)]
        else:
            argv += self._tls_client_args()
        if key == REGISTERED:
            key = self.node_key(index) if self.auth else None
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key)]
        return argv

    def start_supernode(self, index: int, key: Path | str | None = REGISTERED, root_certificates: Path | None = None,
                        name: str | None = None) -> Process:
        """Start the SuperNode of client `index`; `key` and `root_certificates` override its credentials (see
        supernode_argv; to try bad ones, with another `name` for its log)."""
        name = name or f"supernode-{index}"
        proc = self.spawn(name, self.supernode_argv(index, key, root_certificates))
        if name == f"supernode-{index}":
            self.nodes[index] = proc
        serves = f"data={self.client_data[index]}" if self.client_data else f"client-id={index}"
        self._say(f"SuperNode {index} ({serves}), pid {proc.pid}, log {proc.log}")
        return proc

    def kill_supernode(self, index: int) -> None:
        """SIGKILL SuperNode `index` and every process it started (its ClientApp too), as a machine that dies."""
        proc = self.nodes[index]
        pids = sorted(pid for pid, _ in process_family(proc.pid, tree=proc.popen.poll() is None))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.popen.wait()
        self._say(f"killed SuperNode {index} (pids {', '.join(map(str, pids))})")

    def wait_connected(self, proc: Process, timeout: float = START_TIMEOUT_S, strict: bool = True) -> None:
        """Until the SuperLink accepted `proc` (its log names its node id). FedDATError if it exits, or (strict)
        if it is still not accepted after `timeout`; not strict, a node still trying is left to the run."""
        end = time.time() + timeout
        while time.time() < end:
            if NODE_ID_LINE in proc.log_text():
                self._say(f"{proc.name} connected")
                return
            if not proc.running():
                raise FedDATError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.tail()}")
            time.sleep(0.5)
        if strict:
            raise FedDATError(f"{proc.name} did not connect within {timeout:.0f} s:\n{proc.tail()}")
        self._say(f"{proc.name} has not said it connected after {timeout:.0f} s; going on (log: {proc.log})")

    def wait_refused(self, proc: Process, timeout: float = 60.0) -> str:
        """Until `proc` (a SuperNode with bad credentials) exits; its log. FedDATError if the SuperLink accepted
        it or it is still running after `timeout`."""
        end = time.time() + timeout
        while time.time() < end and proc.running():
            if NODE_ID_LINE in proc.log_text():
                raise FedDATError(f"the SuperLink accepted {proc.name}:\n{proc.tail()}")
            time.sleep(0.2)
        if proc.running():
            raise FedDATError(f"{proc.name} neither connected nor exited within {timeout:.0f} s:\n{proc.tail()}")
        self._say(f"{proc.name} was refused (exit code {proc.popen.returncode})")
        return proc.log_text()

    def restart_supernode(self, index: int, timeout: float = 180.0) -> Process:
        """Start SuperNode `index` again with its key, config and client-state-dir, as a supervisor would, until
        the SuperLink accepts it. (With authentication the node keeps its node id; the SuperLink takes the
        same key again only once it counts the dead process as offline, i.e. after two missed heartbeats.)"""
        end = time.time() + timeout
        while True:
            proc = self.start_supernode(index)
            try:
                self.wait_connected(proc, timeout=max(end - time.time(), 1.0))
                return proc
            except FedDATError:
                if proc.running() or time.time() > end:
                    raise
                stop_processes([proc])  # what the refused attempt started
                time.sleep(3.0)

    def run(self, run_config: Mapping[str, Any], timeout: float = 3600.0) -> dict:
        """`flwr run` of FedDAT with `run_config` (run-config keys as in pyproject.toml; `clients` (or, with
        client folders, `nodes`) and `out-dir` are set here): streams its log, waits for the run to end and
        returns results.json."""
        import json

        size = {"nodes": self.clients} if self.client_data else {"clients": self.clients}
        values = {**size, "out-dir": str(self.out), **dict(run_config)}
        check_run_config(self.app_dir, values)
        config_file = self.workdir / "run-config.toml"
        config_file.write_text(toml_text(values))
        (self.out / "results.json").unlink(missing_ok=True)
        self._say(f"flwr run {self.app_dir} {CONNECTION} --run-config {config_file} --stream")
        proc = self.spawn("flwr-run", [self._exe("flwr"), "run", str(self.app_dir), CONNECTION, "--run-config",
                                       str(config_file), "--stream"], log=self.logs / "run.log")
        follower = threading.Thread(target=self._follow, args=(proc,), daemon=True)
        follower.start()
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FedDATError(f"the run did not finish within {timeout:.0f} s; its log: {proc.log}\n"
                              f"{proc.tail()}") from None
        finally:
            follower.join(timeout=2)
        results = self.out / "results.json"
        if not results.exists():
            dead = [p.name for p in self.processes if not p.running() and p is not proc and p.popen.returncode]
            raise FedDATError(f"the run ended without {results} (flwr run exit code {proc.popen.returncode}"
                              + (f"; exited: {', '.join(dead)}" if dead else "") + f"); its log: {proc.log}\n"
                              + proc.tail())
        return json.loads(results.read_text())

    def _follow(self, proc: Process) -> None:
        """Echo the run's log as it grows."""
        if self.echo is None:
            return
        with open(proc.log, errors="replace") as f:
            f.seek(proc.offset)
            while True:
                line = f.readline()
                if line:
                    self.echo(line.rstrip("\n"))
                elif not proc.running():
                    rest = f.read()
                    for tail in rest.splitlines():
                        self.echo(tail)
                    return
                else:
                    time.sleep(0.2)


def check_run_config(app_dir: Path, values: Mapping[str, Any]) -> None:
    """FedDATError naming what is wrong with run-config `values` before anything starts: keys the app's run
    config does not have (flwr run may only override keys of [tool.flwr.app.config]), and values the
    ServerApp would refuse (checked as it checks them, on the app's defaults overridden by `values`)."""
    known = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"].get("config", {})
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise FedDATError(f"unknown run-config keys {unknown}; the app's keys ([tool.flwr.app.config] in "
                          f"{app_dir / 'pyproject.toml'}): {', '.join(known)}")
    given = normalise({**known, **values})
    for key in ("out_dir", "resume_dir"):  # the ServerApp's, not the run's config
        given.pop(key, None)
    RunConfig.from_dict(given)


def find_app_dir() -> Path:
    """The Flower app's directory: the nearest folder above this module with a pyproject.toml declaring
    [tool.flwr.app] (the repository, for an editable install)."""
    for parent in Path(__file__).resolve().parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text():
            return parent
    raise FedDATError("found no Flower app (a pyproject.toml with [tool.flwr.app]) above "
                      f"{Path(__file__).parent}; pass --app DIR, the repository's root")


# ----- command line -----
def parse_run_config(text: str) -> dict[str, Any]:
    """`k=v k2="s"` (as `flwr run --run-config` takes it) into a dict, keys as written (node-config keys such as
    client-id are not run-config keys); FedDATError naming a malformed item."""
    return parse_pairs(text or "", config_keys=False)
