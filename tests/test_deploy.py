"""A real Flower deployment on loopback (feddat.federation.deploy): SuperLink and SuperNodes as processes,
TLS, SuperNode authentication, secure aggregation, a SuperNode killed mid-round. Every test stops every process it
started, also when it fails (the Deployment context manager)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from feddat.errors import FedDATError
from tiny import close

TOL = 1e-6
SECURE_TOL = 1e-5   # SecAgg+ quantises each value to 16 / 2**22, about 4e-6


def _run_config(cfg) -> dict:
    """The run-config values that make the ServerApp build `cfg`: every field that differs from the defaults
    (for the tests, the tiny backbone and sizes of conftest.py)."""
    from feddat.config import RunConfig

    default = RunConfig()
    return {k.replace("_", "-"): v for k, v in cfg.to_dict().items()
            if k != "engine" and v is not None and v != getattr(default, k)}


def _same_config(got: dict, cfg) -> bool:
    return {k: v for k, v in got["config"].items() if k != "engine"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "engine"}


def _no_process_left(deployment) -> None:
    from feddat.federation.deploy.processes import running

    assert not deployment.processes and deployment.stopped
    left = [pid for pid, started in deployment.stopped if running((pid, started))]
    assert not left, f"processes {left} outlived the deployment"


# ----- fast: the pieces -----
def test_credentials_are_what_flower_loads(tmp_path):
    """The CA signs the SuperLink's certificate for localhost and 127.0.0.1; node keys are OpenSSH EC keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from feddat.federation.deploy.certificates import write_node_key, write_tls_files

    tls = write_tls_files(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    public = write_node_key(tmp_path / "keys" / "supernode-0")
    assert isinstance(load_ssh_private_key((tmp_path / "keys" / "supernode-0").read_bytes(), None),
                      ec.EllipticCurvePrivateKey)
    assert isinstance(load_ssh_public_key(public.read_bytes()), ec.EllipticCurvePublicKey)
    assert (tmp_path / "keys" / "supernode-0").stat().st_mode & 0o077 == 0


def test_bad_deployment_inputs_are_refused(tmp_path, capsys):
    from feddat.cli import main
    from feddat.federation.deploy.deployment import Deployment, parse_run_config, toml_text

    assert parse_run_config("rounds=2 model-path='/a b/c' method=fedavg-adapter secure-aggregation=true") == \
        {"rounds": 2, "model-path": "/a b/c", "method": "fedavg-adapter", "secure-aggregation": True}
    with pytest.raises(FedDATError, match="'rounds' is not key=value"):
        parse_run_config("rounds")
    with pytest.raises(FedDATError, match="must be a string, boolean or number"):
        toml_text({"rounds": [1, 2]})
    with pytest.raises(FedDATError, match="authentication needs TLS"):
        Deployment(tmp_path, 3, tls=False, auth=True)
    with pytest.raises(FedDATError, match="positive number of clients"):
        Deployment(tmp_path, 0)
    for flags, message in ((["--clients", "0"], "--clients must be a positive integer"),
                           (["--run-config", "out-dir='/x'"], "may not set out-dir"),
                           (["--run-config", "roundz=2"], "unknown run-config keys ['roundz']"),
                           (["--timeout", "0"], "--timeout must be a positive number"),
                           (["--clients", "6"], "clients must be an integer from 1 to the benchmark's 5"),
                           (["--run-config", "rounds=0"], "rounds must be a positive integer")):
        assert main(["deploy", "--workdir", str(tmp_path / "w"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before anything started


def test_clients_and_secure_aggregation_are_validated(tiny_config):
    from feddat.config import RunConfig
    from feddat.federation.inprocess import run

    assert [c.name for c in RunConfig(clients=3).validate().client_specs()] == ["clipart", "textured", "night"]
    with pytest.raises(FedDATError, match="clients must be an integer from 1 to the benchmark's 5"):
        RunConfig(clients=6).validate()
    with pytest.raises(FedDATError, match="min-clients must be an integer from 1 to the benchmark's 3"):
        RunConfig(clients=3, min_clients=4).validate()
    with pytest.raises(FedDATError, match="no client 'blurry'"):
        RunConfig(clients=3, fault_injection="crash:blurry").validate()
    with pytest.raises(FedDATError, match="secure-aggregation must be true or false"):
        RunConfig(secure_aggregation="yes").validate()
    for bad, what in ((dict(aggregation="median"), "aggregation=median"), (dict(max_update_norm=1.0), "max-update"),
                      (dict(dp_clip=0.1), "dp-clip"), (dict(round_retries=1), "round-retries"),
                      (dict(method="local-adapter"), "shares nothing"), (dict(clients=2), "at least 3")):
        with pytest.raises(FedDATError, match=f"secure-aggregation cannot go with .*{what}"):
            RunConfig(secure_aggregation=True, **bad).validate()
    with pytest.raises(FedDATError, match="needs the Flower engine"):
        run(tiny_config(clients=3, secure_aggregation=True), progress=False)


def test_the_securely_aggregated_mean_is_checked_before_use():
    from feddat.federation.flower.secagg import new_global

    ref = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    change = {"a": torch.full((6,), 0.5, dtype=torch.float64), "b": torch.zeros(4, dtype=torch.float64)}
    new = new_global(ref, change)
    assert new["a"].dtype == torch.float32 and torch.equal(new["a"], torch.full((2, 3), 0.5))
    with pytest.raises(FedDATError, match="NaN or infinite"):
        new_global(ref, {**change, "b": torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=torch.float64)})
    with pytest.raises(FedDATError, match="of shape"):
        new_global(ref, {**change, "b": torch.zeros(5, dtype=torch.float64)})
    with pytest.raises(FedDATError, match="returned tensors"):
        new_global(ref, {"a": change["a"]})


# ----- deployments -----
@pytest.mark.integration
def test_deployment_with_tls_and_authentication(tiny_config, tmp_path):
    """The CI deployment: a SuperLink and 3 SuperNodes as processes on loopback, TLS and SuperNode authentication
    on, 2 rounds. SuperNodes without valid credentials are refused; the run gives the in-process engine's
    numbers; every process is gone afterwards."""
    from feddat.federation.deploy.certificates import write_node_key, write_tls_files
    from feddat.federation.deploy.deployment import Deployment
    from feddat.federation.inprocess import run

    t0 = time.time()
    cfg = tiny_config(clients=3, eval_every=2)
    ref = run(cfg, progress=False)
    with Deployment(tmp_path / "deploy", 3, echo=None) as d:
        stranger = write_node_key(tmp_path / "stranger")        # a key nobody registered
        other_ca = write_tls_files(tmp_path / "other-tls").ca    # a CA the SuperLink's certificate is not from
        refused = {
            "no key": d.start_supernode(0, key=None, name="no-key"),
            "unregistered key": d.start_supernode(0, key=stranger.with_suffix(""), name="unregistered"),
            "untrusted CA": d.start_supernode(0, root_certificates=other_ca, name="untrusted-ca"),
        }
        logs = {why: d.wait_refused(proc) for why, proc in refused.items()}
        assert "must be registered" in logs["no key"]
        assert "Failed to activate SuperNode" in logs["unregistered key"]
        assert "CERTIFICATE_VERIFY_FAILED" in logs["untrusted CA"]
        got = d.run(_run_config(cfg), timeout=900)
    _no_process_left(d)

    assert got["config"]["engine"] == "flower" and _same_config(got, cfg)
    assert got["clients"] == ref["clients"] == ["clipart", "textured", "night"]
    assert len(got["rounds"]) == len(ref["rounds"]) == 2
    for g, r in zip(got["rounds"], ref["rounds"]):
        assert "missing_clients" not in g and g["bytes_sent"] == r["bytes_sent"]
        for client in r["train"]:
            assert close(g["train"][client], r["train"][client], TOL), (g["round"], client)
    assert close(got["final"]["clients"], ref["final"]["clients"], TOL)
    assert sorted(p.name for p in (tmp_path / "deploy" / "out" / "clients").iterdir()) == ["clipart", "night",
                                                                                           "textured"]
    print(f"deployment with TLS and SuperNode authentication: {time.time() - t0:.0f} s")


@pytest.mark.integration
def test_deployment_with_secure_aggregation(tiny_config, tmp_path):
    """SecAgg+ in a deployment whose SuperNodes bring their own client folders (TLS and authentication on), 3
    clients, one round: the server records who took part but no update norms (it never sees an update), and the
    global adapter it unmasks equals the plain weighted mean of the in-process engine on the same folders to
    SecAgg+'s quantisation."""
    from feddat.cli import main
    from feddat.federation.checkpoint import load_checkpoint
    from feddat.federation.deploy.deployment import Deployment
    from feddat.federation.inprocess import run

    t0 = time.time()
    export = tmp_path / "export"
    assert main(["data", "--benchmark", "domain", "--export", str(export), "--cache-dir", str(tmp_path / "gen"),
                 "--train-per-client", "32", "--val-per-client", "8", "--test-per-client", "32"]) == 0
    names = ["clipart", "night", "textured"]
    folders = [export / n for n in names]
    ref = run(tiny_config(client_data=",".join(f"{n}={f}" for n, f in zip(names, folders)), rounds=1),
              out_dir=tmp_path / "ref", progress=False)
    cfg = tiny_config(nodes=3, rounds=1, secure_aggregation=True)
    with Deployment(tmp_path / "deploy", client_data=folders, echo=None) as d:
        got = d.run(_run_config(cfg), timeout=1200)
    _no_process_left(d)

    assert _same_config(got, cfg)
    (g,), (r,) = got["rounds"], ref["rounds"]
    assert g["secure_aggregation"] == {"protocol": "SecAgg+", "clients": names}
    assert "missing_clients" not in g and "update_norms" not in g
    for client in r["train"]:
        assert close(g["train"][client], r["train"][client], TOL), client
    secure, plain = load_checkpoint(d.out).global_state, load_checkpoint(tmp_path / "ref").global_state
    assert secure.keys() == plain.keys()
    for key in plain:
        assert secure[key].dtype == plain[key].dtype and secure[key].shape == plain[key].shape
        assert (secure[key].double() - plain[key].double()).abs().max() <= SECURE_TOL, key
    assert not all(torch.equal(secure[k], plain[k]) for k in plain)  # it went through SecAgg+'s quantisation
    assert set(got["final"]["clients"]) == set(names)
    print(f"deployment with SecAgg+: {time.time() - t0:.0f} s")


@pytest.mark.integration
def test_a_killed_supernode_does_not_stop_the_federation(tiny_config, tmp_path):
    """SuperNode 2 (client night) is killed (SIGKILL, with its ClientApp) in the middle of round 1, after it
    trained and before it answered. Round 1 aggregates the other two and results.json names night as missing;
    night's SuperNode, restarted with its key and client-state-dir (as a supervisor would), serves the next
    rounds and the final evaluation from its saved state."""
    from feddat.federation.deploy.deployment import Deployment

    t0 = time.time()
    cfg = tiny_config(clients=3, eval_every=2, round_timeout=120.0, fault_injection="slow:night@1=600")
    with Deployment(tmp_path / "deploy", 3, echo=None) as d:
        mid_round = d.node_dir(2) / "client-state"
        events: dict = {}

        def kill_then_restart():
            try:
                end = time.time() + 600
                while not list(mid_round.glob("*/night/round-0001.safetensors")) and time.time() < end:
                    time.sleep(0.5)
                d.kill_supernode(2)
                events["killed"] = time.time()
                d.restart_supernode(2, timeout=240)
                events["restarted"] = time.time()
            except BaseException as e:  # reported by the test below
                events["error"] = e

        chaos = threading.Thread(target=kill_then_restart, daemon=True)
        chaos.start()
        got = d.run(_run_config(cfg), timeout=900)
        chaos.join(timeout=60)
    _no_process_left(d)

    assert "error" not in events, events.get("error")
    assert "killed" in events and "restarted" in events
    first = got["rounds"][0]
    assert set(first["missing_clients"]) == {"night"}, first.get("missing_clients")
    assert first["missing_clients"]["night"].startswith(("timed out", "failed")), first["missing_clients"]
    assert set(first["train"]) == {"clipart", "textured"} and set(first["update_norms"]) == {"clipart", "textured"}
    assert set(got["final"]["clients"]) == {"clipart", "textured", "night"}
    print(f"deployment with a killed SuperNode: {time.time() - t0:.0f} s "
          f"(restart accepted {events['restarted'] - events['killed']:.0f} s after the kill)")
