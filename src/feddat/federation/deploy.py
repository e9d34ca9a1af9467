"""A Flower deployment on one machine: a SuperLink and one SuperNode per client, each its own process.

`feddat deploy` (and `Deployment` from Python) does what an operator types on separate machines
(docs/deployment.md), on loopback ports chosen at run time:

1. makes a certificate authority and the SuperLink's TLS certificate (`tls/`), and one OpenSSH EC key pair per
   SuperNode (`keys/`);
2. starts `flower-superlink` with TLS and SuperNode authentication (`--enable-supernode-auth`);
3. registers every SuperNode's public key with `flwr supernode register`;
4. starts one `flower-supernode` per client, each with its own node config (`nodes/<i>/node-config.toml`:
   `client-id = i`, its own `client-state-dir` and benchmark `cache-dir`, as on a machine of its own), its
   private key and the CA certificate;
5. runs FedDAT with `flwr run <app> deployment --run-config <toml> --stream`, showing the streamed log;
6. stops every process it started (and the processes those started), also on Ctrl-C, SIGTERM, an error or a
   timeout; with Linux, they also get SIGTERM if the process driving the deployment dies.

Layout of the work directory:

    tls/        ca.pem, ca.key, superlink.pem, superlink.key
    keys/       supernode-<i>, supernode-<i>.pub
    flwr-home/  config.toml (the `deployment` SuperLink connection of flwr run / flwr supernode), apps/
    nodes/<i>/  node-config.toml, client-state/, cache/
    logs/       superlink.log, supernode-<i>.log, flwr.log (registrations), run.log
    out/        results.json, clients/, checkpoint/ (written by the ServerApp)
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from feddat.errors import FedDATError

LOOPBACK = "127.0.0.1"
CONNECTION = "deployment"          # the SuperLink connection's name in flwr-home/config.toml
START_TIMEOUT_S = 60.0             # for the SuperLink to accept connections
STOP_GRACE_S = 5.0                 # between SIGTERM and SIGKILL when stopping
NODE_ID_LINE = "SuperNode ID"      # what flower-supernode logs once the SuperLink accepted it
REGISTERED = "registered"          # start_supernode's default key: the one registered for that node


# ----- ports, certificates, keys -----
def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it), so parallel deployments do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TLSFiles:
    ca: Path         # the CA certificate: SuperNodes and flwr (--root-certificates) trust it
    cert: Path       # the SuperLink's certificate, signed by the CA
    key: Path        # the SuperLink's private key


def write_tls_files(directory: Path, hosts: tuple[str, ...] = ("localhost", LOOPBACK), days: int = 30) -> TLSFiles:
    """A new CA and a SuperLink certificate it signs, valid for `hosts` (names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def usage(ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    def sans() -> list[x509.GeneralName]:
        out: list[x509.GeneralName] = []
        for h in hosts:
            try:
                out.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                out.append(x509.DNSName(h))
        return out

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = name("FedDAT deployment CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(usage(ca=True), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    files = TLSFiles(directory / "ca.pem", directory / "superlink.pem", directory / "superlink.key")
    _write_private(directory / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    _write_private(files.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    return files


def write_node_key(path: Path) -> Path:
    """A SuperNode's key pair in OpenSSH format (EC P-384, what Flower's node authentication takes): the private
    key at `path` (mode 600), the public one at `path`.pub, which is returned."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    public = path.with_name(path.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return public


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    os.chmod(path, 0o600)
    path.write_bytes(data)


def toml_text(values: Mapping[str, Any]) -> str:
    """Flat key = value lines (strings, booleans, integers, floats), as flwr reads a run or node config file."""
    import tomli_w

    for k, v in values.items():
        if not isinstance(v, (str, bool, int, float)):
            raise FedDATError(f"config value {k}={v!r} must be a string, boolean or number")
    return tomli_w.dumps(dict(values))


# ----- processes -----
# A process is named by (pid, start time): the system gives a pid again once it is free, so a pid alone could
# name a stranger by the time it is signalled.
Identity = tuple[int, int]


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the name (state, ppid, pgrp, session, ..., start time at 19)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, session id, start time) of every process (Linux /proc; elsewhere empty)."""
    table = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields is not None:
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return table


def _descendants(pid: int, table: dict[int, tuple[int, int, int]]) -> list[int]:
    """Every process below `pid`."""
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _family(pid: int, tree: bool = True) -> set[Identity]:
    """What stopping process `pid` must reach: every process left in its session (each process here is started
    as a session leader, so its session id is its pid; this finds what it started even after it died and init
    adopted them) and, with `tree` (only while `pid` is ours, i.e. not yet reaped and so not reused), `pid` and
    every process below it."""
    table = _process_table()
    pids = {p for p, (_, session, _) in table.items() if session == pid}
    if tree and pid in table:
        pids |= {pid, *_descendants(pid, table)}
    return {(p, table[p][2]) for p in pids}


def running(identity: Identity) -> bool:
    """Whether that process still runs (a zombie does not)."""
    fields = _stat(identity[0])
    return fields is not None and int(fields[19]) == identity[1] and fields[0] != "Z"


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started it dies (Linux), so nothing outlives
    a deployment whose driver was killed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Spawner:
    """A thread that runs the calls given to it, one at a time, until closed."""

    def __init__(self):
        import queue

        self._calls: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="deploy-spawner", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, box, done = item
            try:
                box.append((True, fn()))
            except BaseException as e:  # handed to the caller
                box.append((False, e))
            done.set()

    def call(self, fn: Callable[[], Any]) -> Any:
        box: list = []
        done = threading.Event()
        self._calls.put((fn, box, done))
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._calls.put(None)
        self._thread.join(timeout=5)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path
    offset: int = 0      # where this process's output starts in `log` (a restarted node appends to its log)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """What this process wrote to its log."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def stop_processes(processes: list[Process], grace: float = STOP_GRACE_S) -> set[Identity]:
    """SIGTERM each process, every process below it and every process left in its session; SIGKILL what is
    left after `grace`. Returns the processes it stopped."""
    targets: set[Identity] = set()

    def gather() -> None:
        for p in processes:
            targets.update(_family(p.pid, tree=p.popen.poll() is None))

    def signal_all(sig: int) -> None:
        for identity in targets:
            if running(identity):
                try:
                    os.kill(identity[0], sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def wait_gone() -> None:
        end = time.time() + grace
        while time.time() < end and any(running(i) for i in targets):
            for p in processes:
                p.popen.poll()  # reap our own children
            time.sleep(0.1)

    gather()
    signal_all(signal.SIGTERM)
    wait_gone()
    gather()  # and whatever was started meanwhile
    if any(running(i) for i in targets):
        signal_all(signal.SIGKILL)
        wait_gone()
    return targets


# ----- the deployment -----
@dataclass
class Deployment:
    """A SuperLink and `clients` SuperNodes on this machine; use as a context manager (stops everything on exit).

    tls: the SuperLink serves TLS with a certificate of a CA made here; SuperNodes and flwr trust that CA.
    auth: SuperNode authentication (needs tls): only SuperNodes whose public key was registered connect.
    node_config: extra node-config values for every SuperNode (e.g. device, threads, model-path).
    echo: where progress lines and the streamed run log go (None: only to the log files).
    """

    workdir: Path
    clients: int
    tls: bool = True
    auth: bool = True
    node_config: dict[str, Any] = field(default_factory=dict)
    app_dir: Path | None = None
    echo: Callable[[str], None] | None = print
    processes: list[Process] = field(default_factory=list, init=False)
    nodes: dict[int, Process] = field(default_factory=dict, init=False)
    port: int = field(default=0, init=False)

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
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
        self._spawner: _Spawner | None = None
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
            self._spawner = _Spawner()
        popen = self._spawner.call(lambda: self._popen(argv, log))
        proc = Process(name, popen, log, offset)
        self.processes.append(proc)
        return proc

    def _popen(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:
            return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                    cwd=self.workdir, start_new_session=True,
                                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

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
            self._say(f"registered the public key of SuperNode {i} ({key.name}.pub)")

    def supernode_argv(self, index: int, key: Path | str | None = REGISTERED,
                       root_certificates: Path | None = None) -> list[str]:
        """flower-supernode's command line for client `index`: `key` is its private key (by default the one
        registered for it; None: no key), `root_certificates` the CA it trusts (by default the deployment's)."""
        node = self.node_dir(index)
        node.mkdir(parents=True, exist_ok=True)
        config = {"client-id": index, "client-state-dir": str(node / "client-state"),
                  "cache-dir": str(node / "cache"), **self.node_config}
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
        self._say(f"SuperNode {index} (client-id={index}), pid {proc.pid}, log {proc.log}")
        return proc

    def kill_supernode(self, index: int) -> None:
        """SIGKILL SuperNode `index` and every process it started (its ClientApp too), as a machine that dies."""
        proc = self.nodes[index]
        pids = sorted(pid for pid, _ in _family(proc.pid, tree=proc.popen.poll() is None))
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
        """`flwr run` of FedDAT with `run_config` (run-config keys as in pyproject.toml; `clients` and `out-dir`
        are set here): streams its log, waits for the run to end and returns results.json."""
        import json

        values = {"clients": self.clients, "out-dir": str(self.out), **dict(run_config)}
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
    import tomllib

    from feddat.federation.flower_app import config_from_values

    known = tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"].get("config", {})
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise FedDATError(f"unknown run-config keys {unknown}; the app's keys ([tool.flwr.app.config] in "
                          f"{app_dir / 'pyproject.toml'}): {', '.join(known)}")
    config_from_values({**known, **values})


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
    """`k=v k2="s"` (as `flwr run --run-config`) into a dict; FedDATError naming a malformed item."""
    import re
    import tomllib

    values: dict[str, Any] = {}
    for item in re.findall(r"\S+?=(?:'[^']*'|\"[^\"]*\"|\S+)|\S+", text or ""):
        if "=" not in item:
            raise FedDATError(f"--run-config item {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw  # an unquoted string, e.g. method=fedavg-adapter
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="directory for certificates, keys, node state, logs and the "
                   "run's out/ (results.json, clients/, checkpoint/)")
    p.add_argument("--clients", type=int, default=3, help="SuperNodes to start, one per client: the benchmark's "
                   "first N clients (default: 3)")
    p.add_argument("--run-config", default="", help="run-config values as for flwr run, e.g. \"rounds=2 "
                   "model-path='/path/to/backbone' secure-aggregation=true\" (keys: [tool.flwr.app.config])")
    p.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication")
    p.add_argument("--no-auth", action="store_true", help="TLS, but any SuperNode may connect")
    p.add_argument("--node-config", default="", help="extra node-config values for every SuperNode, e.g. "
                   "\"device='cuda' threads=4\" (each node gets client-id, and its own client-state-dir and "
                   "cache-dir under WORKDIR/nodes/<i>/ unless given here)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds the run may take (default: 3600)")
    p.add_argument("--app", help="the Flower app's directory (default: the repository this module is in)")


def _sigterm_to_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    """`feddat deploy`: start, run once, print the results' table, stop everything."""
    from feddat.eval.results import client_table

    if args.clients < 1:
        raise FedDATError(f"--clients must be a positive integer, got {args.clients}")
    if args.timeout <= 0:
        raise FedDATError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    run_config = parse_run_config(args.run_config)
    for key in ("clients", "out-dir"):
        if key in run_config:
            raise FedDATError(f"--run-config may not set {key}: feddat deploy sets it (use --clients / --workdir)")
    deployment = Deployment(Path(args.workdir), args.clients, tls=not args.insecure,
                            auth=not (args.insecure or args.no_auth), node_config=parse_run_config(args.node_config),
                            app_dir=Path(args.app) if args.app else None)
    check_run_config(deployment.app_dir, {"clients": args.clients, **run_config})
    previous = signal.signal(signal.SIGTERM, _sigterm_to_exit)
    try:
        with deployment:
            results = deployment.run(run_config, timeout=args.timeout)
    except KeyboardInterrupt:
        print(f"feddat deploy: interrupted; every process it started is stopped (logs in {deployment.logs})",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()
    print(client_table(results))
    missing = {r["round"] + 1: sorted(r["missing_clients"]) for r in results["rounds"] if r.get("missing_clients")}
    for round_number, names in missing.items():
        print(f"round {round_number}: no result from {', '.join(names)}")
    print(f"\nwrote {deployment.out / 'results.json'}; logs in {deployment.logs}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m feddat.federation.deploy", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        sys.exit(main(parser.parse_args()))
    except FedDATError as e:
        print(f"feddat deploy: error: {e}", file=sys.stderr)
        sys.exit(2)
