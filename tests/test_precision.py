"""`precision` (fp32 or bf16 autocast around the forward passes) and `compile` (torch.compile the backbone)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from feddat.cli import main
from feddat.errors import FedDATError


def _fit_once(setup):
    cfg, worker, client = setup.cfg, setup.worker, setup.clients[0]
    state = worker.initial_state(0, client.head_spec, cfg.seed)
    global_state = worker.initial_global(cfg.seed)
    res = worker.fit(client, state, global_state, 0, 1, cfg.seed, 0)
    return worker, client, state, global_state, res


def test_bf16_trains_under_autocast(tiny_config):
    cfg = tiny_config(method="feddat", rounds=1, precision="bf16")
    from feddat.federation.inprocess import build

    setup = build(cfg)
    worker = setup.worker
    assert worker.model.autocast_dtype == torch.bfloat16
    # the encoder's matrix products give bfloat16 during a forward pass of local training
    seen = []
    hook = worker.model.backbone.encoder.layer[-1].intermediate.dense.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype))
    worker, client, state, global_state, res = _fit_once(setup)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert res.metrics and all(math.isfinite(v) for v in res.metrics.values())
    # both the private adapter and the travelling one moved, and they stay float32
    changed = [k for k, v in res.state.items() if k.startswith("adapter.") and not torch.equal(v, state[k])]
    assert changed and all(res.state[k].dtype == torch.float32 for k in changed)
    assert any(not torch.equal(v, global_state[k]) for k, v in res.update.items())
    scored = worker.evaluate(client, res.state, res.update)
    for view in scored.values():
        assert 0.0 <= view["score"] <= 1.0 and view["scores"].dtype == torch.float32


def test_bf16_trains_the_shipped_blip(tmp_path):
    from feddat.config import RunConfig
    from feddat.federation.inprocess import build

    cfg = RunConfig(backbone="blip", method="feddat", precision="bf16", rounds=1, clients=1, train_per_client=16,
                    val_per_client=8, test_per_client=16, batch_size=8, threads=1,
                    cache_dir=str(tmp_path / "cache")).validate()
    setup = build(cfg)
    seen = []
    setup.worker.model.backbone.text_model.encoder.layer[-1].intermediate.dense.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype))
    worker, client, state, global_state, res = _fit_once(setup)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(math.isfinite(v) for v in res.metrics.values())
    assert any(not torch.equal(v, global_state[k]) for k, v in res.update.items())
    assert 0.0 <= worker.evaluate(client, res.state, res.update)[worker.method.predict_view]["score"] <= 1.0


def test_bf16_run_gives_scores_close_to_fp32(tiny_config):
    from feddat.federation.inprocess import run

    fp32 = run(tiny_config(method="fedavg-adapter", rounds=1), progress=False)
    bf16 = run(tiny_config(method="fedavg-adapter", rounds=1, precision="bf16"), progress=False)
    a = fp32["final"]["clients"]
    b = bf16["final"]["clients"]
    assert set(a) == set(b)
    for name in a:
        assert 0.0 <= b[name] <= 1.0
        assert abs(a[name] - b[name]) < 0.25
    assert bf16["config"]["precision"] == "bf16" and fp32["config"]["precision"] == "fp32"


@pytest.mark.parametrize("values, message", [({"precision": "fp16"}, "precision must be one of fp32, bf16"),
                                             ({"compile": "yes"}, "compile must be true or false")])
def test_bad_values_are_refused(tiny_config, values, message):
    with pytest.raises(FedDATError, match=message):
        tiny_config(**values)


def test_cli_takes_precision_and_compile_flags(tiny_backbone_dir, tmp_path, capsys):
    assert main(["run", "--precision", "fp16", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "precision must be one of fp32, bf16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--compile", "maybe", "--out", str(tmp_path / "y"), "--quiet"])
    out = tmp_path / "run"
    assert main(["run", "--precision", "bf16", "--no-compile", "--model-path", str(tiny_backbone_dir),
                 "--rounds", "1", "--clients", "2", "--train-per-client", "16", "--val-per-client", "8",
                 "--test-per-client", "16", "--batch-size", "8", "--reduction", "4", "--threads", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["precision"] == "bf16" and config["compile"] is False


def _compile_available() -> str | None:
    """None if torch.compile (inductor) works here, else why not."""
    try:
        f = torch.compile(lambda x: torch.relu(x) + 1)
        f(torch.randn(4))
    except Exception as e:  # no C++ compiler, unsupported platform or Python version
        return f"torch.compile is unavailable on this platform: {type(e).__name__}: {str(e).splitlines()[0]}"
    return None


@pytest.mark.slow
def test_compile_gives_the_same_predictions(tiny_config):
    reason = _compile_available()
    if reason:
        pytest.skip(reason)
    from feddat.federation.inprocess import build

    results = []
    for compiled in (False, True):
        cfg = tiny_config(method="fedavg-adapter", rounds=1, compile=compiled)
        worker, client, _, _, res = _fit_once(build(cfg))
        scored = worker.evaluate(client, res.state, res.update)[worker.method.predict_view]
        results.append((res, scored))
    (eager, eager_scored), (compiled, compiled_scored) = results
    assert compiled.metrics["loss"] == pytest.approx(eager.metrics["loss"], rel=1e-3, abs=1e-4)
    for k, v in eager.state.items():
        assert torch.allclose(compiled.state[k], v, atol=1e-4), k
    agree = (compiled_scored["predictions"] == eager_scored["predictions"]).float().mean().item()
    assert agree >= 0.95
    assert compiled_scored["score"] == pytest.approx(eager_scored["score"], abs=0.05)
    # the worker compiled every encoder layer in place
    worker = build(tiny_config(method="fedavg-adapter", rounds=1, compile=True)).worker
    assert all(layer._compiled_call_impl is not None for layer in worker.model.backbone.encoder.layer)
