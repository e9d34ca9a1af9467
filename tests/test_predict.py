"""Saved client models: what a run writes, load_client / predict / eval reproducing the run, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from feddat.cli import main
from feddat.config import RunConfig
from feddat.data.benchmarks import client_records
from feddat.errors import FedDATError
from feddat.federation.inprocess import run
from feddat.federation.rounds import reported_views
from feddat.federation.worker import Worker

TINY = dict(rounds=2, train_per_client=32, val_per_client=8, test_per_client=32, batch_size=16, threads=1,
            reduction=4)


def _run_capturing(cfg: RunConfig, out: Path) -> tuple[dict, dict]:
    """Run with out dir; also return each client's last Worker.evaluate output on its test split (the final
    report's)."""
    captured: dict[str, dict] = {}
    original = Worker.evaluate

    def spy(self, data, state, global_state, split="test", *args, **kwargs):
        result = original(self, data, state, global_state, split, *args, **kwargs)
        if split == "test":
            captured[data.name] = result
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Worker, "evaluate", spy)
        results = run(cfg, out_dir=out, progress=False)
    return results, captured


@pytest.fixture(scope="module")
def saved_run(tiny_backbone_dir, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("saved-run")
    cfg = RunConfig(model_path=str(tiny_backbone_dir), cache_dir=str(root / "cache"), **TINY).validate()
    results, captured = _run_capturing(cfg, root / "run")
    return cfg, root / "run", results, captured


def _test_records(cfg: RunConfig, client: str):
    recs = client_records(cfg.benchmark, cfg.seed, cfg.sizes, Path(cfg.cache_dir))[client]["test"]
    return [recs.images[i] for i in recs.image_index], list(recs.questions)


def test_run_saves_every_client_model(saved_run):
    from safetensors.torch import load_file

    cfg, out, results, _ = saved_run
    assert sorted(p.name for p in (out / "clients").iterdir()) == sorted(results["clients"])
    for client in results["clients"]:
        d = out / "clients" / client
        assert sorted(p.name for p in d.iterdir()) == ["client.json", "model.safetensors"]
        meta = json.loads((d / "client.json").read_text())
        assert meta["client"] == client and meta["method"] == "feddat" and meta["eval_frozen"] == "newest"
        assert meta["predict_view"] == "teacher" and meta["views"] == ["teacher", "student", "local"]
        assert meta["answers"] == results["label_spaces"][client]
        assert meta["backbone"]["model_path"] == str(Path(cfg.model_path).resolve())
        assert len(meta["backbone"]["sha256"]) == 64
        assert meta["adapters"] == {"names": ["global", "local", "global_frozen"], "shared": "global",
                                    "reduction": 4, "bottleneck": 8, "dim": 32, "layers": 2}
        assert meta["head"] == {"task": "vqa", "dim": 32, "n_answers": len(meta["answers"])}
        tensors = load_file(str(d / "model.safetensors"))
        names = {k.split(".")[1] for k in tensors if k.startswith("adapter.")}
        assert names == {"global", "local", "global_frozen"}
        assert tensors["head.net.3.weight"].shape == (len(meta["answers"]), 64)
        # newest: the teacher's frozen copy is the newest aggregate, the same for every client
        for k in (k for k in tensors if k.startswith("adapter.global.")):
            assert torch.equal(tensors[k], tensors[k.replace("adapter.global.", "adapter.global_frozen.")])
    first, second = (load_file(str(out / "clients" / c / "model.safetensors")) for c in results["clients"][:2])
    assert torch.equal(first["adapter.global.0.up.weight"], second["adapter.global.0.up.weight"])
    assert not torch.equal(first["adapter.local.0.up.weight"], second["adapter.local.0.up.weight"])
    assert not list(out.rglob("*.tmp"))


def test_load_client_predicts_what_the_run_scored(saved_run):
    import feddat

    cfg, out, results, captured = saved_run
    for client in results["clients"][:3]:
        model = feddat.load_client(out, client)
        assert model.answers == results["label_spaces"][client]
        images, questions = _test_records(cfg, client)
        for view in reported_views(model.worker.method):
            expected = [model.answers[i] for i in captured[client][view]["predictions"].tolist()]
            got = model.predict(images, questions, view=view, top_k=3)
            assert [p[0][0] for p in got] == expected, (client, view)
            assert all(len(p) == 3 and p[0][1] >= p[1][1] >= p[2][1] and sum(x for _, x in p) <= 1 + 1e-6
                       for p in got)
        # PIL images work the same as arrays; the default view is the predicting one (teacher)
        from PIL import Image

        pil = model.predict([Image.fromarray(images[0])], questions[:1], top_k=1)
        assert pil[0][0][0] == model.answers[int(captured[client]["teacher"]["predictions"][0])]


def test_eval_reproduces_the_runs_final_scores(saved_run, tmp_path, capsys):
    _, out, results, _ = saved_run
    assert main(["eval", "--run", str(out), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert data["final"]["clients"] == results["final"]["clients"]
    assert data["final"]["avg_score"] == results["final"]["avg_score"]
    assert data["final"]["views"] == results["final"]["views"]
    assert data["final"]["breakdown"] == results["final"]["breakdown"]
    printed = capsys.readouterr().out
    assert all(c in printed for c in results["clients"]) and "mean" in printed and "teacher" in printed
    assert main(["eval", "--run", str(out), "--client", "night", "--quiet"]) == 0
    assert "night" in capsys.readouterr().out


def _write_png(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def test_eval_on_a_labelled_file_matches_the_runs_score(saved_run, tmp_path, capsys):
    cfg, out, results, _ = saved_run
    recs = client_records(cfg.benchmark, cfg.seed, cfg.sizes, Path(cfg.cache_dir))["night"]["test"]
    lines = []
    for i, (q, a) in enumerate(zip(recs.questions, recs.answers)):
        _write_png(recs.images[recs.image_index[i]], tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": q, "answer": a}))
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["eval", "--run", str(out), "--client", "night", "--data", str(tmp_path / "test.jsonl"),
                 "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert data["n"] == len(recs.questions) and data["view"] == "teacher"
    assert data["final"]["clients"]["night"] == pytest.approx(results["final"]["clients"]["night"], abs=1e-6)
    assert data["unknown_answers"] == sum(a not in results["label_spaces"]["night"] for a in recs.answers)
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", "--run", str(out), "--client", "night", "--data", str(tmp_path / "test.jsonl"),
                 "--view", "local", "--quiet"]) == 0
    assert "(local view)" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "0.png", "question": "is there a box ?"}) + "\n")
    assert main(["eval", "--run", str(out), "--client", "night", "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert 'record 1 needs a string field "answer"' in capsys.readouterr().err
    assert main(["eval", "--run", str(out), "--data", str(tmp_path / "test.jsonl")]) == 2
    assert "--data needs --client" in capsys.readouterr().err


def test_predict_cli_in_a_fresh_process(saved_run, tiny_backbone_dir, tmp_path):
    import feddat

    cfg, out, results, captured = saved_run
    images, questions = _test_records(cfg, "clipart")
    image = _write_png(images[0], tmp_path / "q.png")
    expected = feddat.load_client(out, "clipart").predict([images[0]], questions[:1], top_k=2)[0]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "feddat.cli", "predict", "--run", str(out), "--client", "clipart",
                           "--image", str(image), "--question", questions[0], "--top-k", "2",
                           "--model-path", str(tiny_backbone_dir)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = [line.rsplit(maxsplit=1) for line in proc.stdout.strip().splitlines()]
    assert [answer.strip() for answer, _ in printed] == [a for a, _ in expected]
    assert [float(p) for _, p in printed] == pytest.approx([p for _, p in expected], abs=1e-4)


def test_predict_cli_batch_and_view(saved_run, tmp_path, capsys):
    import feddat

    cfg, out, _, _ = saved_run
    images, questions = _test_records(cfg, "sketch")
    for i in range(3):
        _write_png(images[i], tmp_path / f"{i}.png")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "question": questions[i], "id": i})
                                               + "\n" for i in range(3)))
    assert main(["predict", "--run", str(out), "--client", "sketch", "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl"), "--view", "student", "--top-k", "2", "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    expected = feddat.load_client(out, "sketch").predict(images[:3], questions[:3], view="student", top_k=2)
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert [r["answers"] for r in rows] == [[a for a, _ in e] for e in expected]
    assert all(len(r["probabilities"]) == 2 for r in rows)


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p.with_name("missing.png"), "does not exist"),
    (lambda p: (p.write_text("not an image"), p)[1], "is unreadable"),
    (lambda p: _write_png(np.zeros((32, 32, 3), np.uint8), p), "takes 48x48 images"),
])
def test_predict_cli_bad_image_is_one_line_exit_2(saved_run, tmp_path, capsys, make_bad, message):
    _, out, _, _ = saved_run
    bad = make_bad(tmp_path / "img.png")
    assert main(["predict", "--run", str(out), "--client", "clipart", "--image", str(bad),
                 "--question", "is there a circle ?"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_damaged_or_mismatched_files_give_clear_errors(saved_run, tiny_backbone_dir, tmp_path):
    import feddat

    _, out, _, _ = saved_run
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    with pytest.raises(FedDATError, match="no saved client 'nope'.*clipart"):
        feddat.load_client(run_dir, "nope")
    with pytest.raises(FedDATError, match="has no view 'frozen'"):
        feddat.load_client(run_dir, "clipart").predict([np.zeros((48, 48, 3), np.uint8)], ["q"], view="frozen")

    # a corrupted model file: the checksum in client.json catches it
    weights = run_dir / "clients" / "clipart" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FedDATError, match="model.safetensors does not match the checksum"):
        feddat.load_client(run_dir, "clipart")
    # garbage with a matching checksum (or no checksum recorded): safetensors cannot parse it
    meta_path = run_dir / "clients" / "clipart" / "client.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_sha256"]
    meta_path.write_text(json.dumps(meta))
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(FedDATError, match="model.safetensors is unreadable or corrupt"):
        feddat.load_client(run_dir, "clipart")
    weights.unlink()
    with pytest.raises(FedDATError, match="model.safetensors is missing"):
        feddat.load_client(run_dir, "clipart")

    # a backbone with other weights (same architecture): refused, naming the checksums
    other = tmp_path / "other-backbone"
    shutil.copytree(tiny_backbone_dir, other)
    from safetensors.torch import load_file, save_file

    w = load_file(str(other / "model.safetensors"))
    first = sorted(w)[0]
    w[first] = w[first] + 1.0
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FedDATError, match="is not the one client night .* was trained on.*sha256"):
        feddat.load_client(run_dir, "night", model_path=other)
    assert main(["eval", "--run", str(run_dir), "--client", "night", "--model-path", str(other), "--quiet"]) == 2


@pytest.mark.parametrize("method, overrides", [
    ("feddat", {"eval_frozen": "last_round"}),
    ("local-adapter", {"rounds": 1}),
    ("head-only", {"rounds": 1}),
])
def test_other_methods_and_last_round_frozen_copy(method, overrides, tiny_config, tmp_path):
    import feddat
    from safetensors.torch import load_file

    from feddat.inference import evaluate_run

    cfg = tiny_config(method=method, **overrides)
    results, captured = _run_capturing(cfg, tmp_path / "run")
    assert evaluate_run(tmp_path / "run")["final"]["clients"] == results["final"]["clients"]
    tensors = load_file(str(tmp_path / "run" / "clients" / "blurry" / "model.safetensors"))
    if method == "feddat":
        # last_round: the stored copy taken at the start of the last round, not the newest aggregate
        assert not torch.equal(tensors["adapter.global.0.up.weight"], tensors["adapter.global_frozen.0.up.weight"])
    elif method == "head-only":
        assert all(k.startswith("head.") for k in tensors)
    model = feddat.load_client(tmp_path / "run", "blurry")
    images, questions = _test_records(cfg, "blurry")
    expected = [model.answers[i] for i in captured["blurry"][model.predict_view]["predictions"].tolist()]
    assert [p[0][0] for p in model.predict(images, questions, top_k=1)] == expected


@pytest.mark.integration
def test_flower_engine_saves_the_same_files(tiny_config, tmp_path):
    from feddat.federation.flower.server_app import run_flower

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(method="feddat", tracker="tensorboard")
    ref = run(cfg, out_dir=tmp_path / "inprocess", progress=False)
    got = run_flower(cfg, out_dir=tmp_path / "flower", progress=False)
    assert got["clients"] == ref["clients"]
    for client in ref["clients"]:
        for name in ("model.safetensors", "client.json"):
            a = (tmp_path / "inprocess" / "clients" / client / name).read_bytes()
            b = (tmp_path / "flower" / "clients" / client / name).read_bytes()
            assert a == b, (client, name)
    # both engines log the same metrics under the same names (timings aside)
    logs = {}
    for engine in ("inprocess", "flower"):
        ea = EventAccumulator(str(tmp_path / engine / "tensorboard"), size_guidance={"scalars": 0})
        ea.Reload()
        logs[engine] = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]
                        if t not in ("seconds", "wall_seconds")}
    assert logs["inprocess"].keys() == logs["flower"].keys()
    for tag, values in logs["inprocess"].items():
        assert logs["flower"][tag] == pytest.approx(values, abs=1e-6), tag
