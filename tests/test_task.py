"""The Task benchmark: four clients with different tasks, heads and losses, trained, scored, saved and asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from feddat.cli import main
from feddat.data.benchmarks import client_records, soft_scores
from feddat.data.pool import HeadSpec
from feddat.data.task import ANSWER_SETS, annotate, choice_example, consensus, entailment_example, pair_example
from feddat.errors import FedDATError
from feddat.federation.inprocess import run
from feddat.models.backbone import load_backbone
from feddat.models.vl import AnswerHead, ChoiceHead, adapt_backbone, make_head, pooled_features

from tiny import randomise_adapters


def _has(scene, color, shape):
    return [o for o in scene.objects if o.color == color and o.shape == shape]


def test_entailment_labels_follow_the_scene():
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(300):
        scene, text, label, _ = entailment_example(rng)
        _, color, shape, _, size = text.split()
        objs = _has(scene, color, shape)
        expected = "neutral" if not objs else ("entailment" if objs[0].size == size else "contradiction")
        assert label == expected, (text, scene)
        seen[label] = seen.get(label, 0) + 1
    assert min(seen.values()) > 70  # the three labels about equally often


def test_pair_statements_follow_both_images():
    rng = np.random.default_rng(1)
    truths = []
    for _ in range(300):
        left, right, text, label, qtype = pair_example(rng)
        color, shape = text.split()[-2:]
        holders = bool(_has(left, color, shape)) + bool(_has(right, color, shape))
        truth = holders == 2 if qtype == "both" else holders == 1
        assert label == ("true" if truth else "false"), (text, left, right)
        truths.append(truth)
    assert 0.4 < np.mean(truths) < 0.6


def test_choice_has_four_distinct_candidates_one_of_them_right():
    rng = np.random.default_rng(2)
    positions = []
    for _ in range(200):
        ex = choice_example(rng)
        if ex is None:
            continue
        _, question, candidates, answer, qtype = ex
        assert len(set(candidates)) == 4 and answer in candidates
        assert set(candidates) <= set(ANSWER_SETS[qtype])
        positions.append(candidates.index(answer))
    assert set(positions) == {0, 1, 2, 3}


def test_annotators_and_soft_scores():
    rng = np.random.default_rng(3)
    answers = annotate("red", "color", rng, 0.8)
    assert len(answers) == 10 and set(answers) <= set(ANSWER_SETS["color"])
    assert consensus(["a", "b", "b", "a", "b"]) == "b"
    row = soft_scores(["red"] * 7 + ["blue"] * 2 + ["green"], {"blue": 0, "green": 1, "red": 2, "cyan": 3})
    assert torch.allclose(row, torch.tensor([0.6, 0.3, 1.0, 0.0]))


def test_heads_per_task_and_grouped_features_match_separate_passes(tiny_backbone_dir):
    torch.manual_seed(0)
    backbone, tok = load_backbone(str(tiny_backbone_dir))
    model = adapt_backbone(backbone, ("global",), 4)
    randomise_adapters(model)
    model.set_view("student")
    d = backbone.config.hidden_size
    assert isinstance(make_head(d, HeadSpec("pair", 2)), AnswerHead)
    assert make_head(d, HeadSpec("pair", 2)).net[0].in_features == 2 * d
    assert isinstance(make_head(d, HeadSpec("choice", 4)), ChoiceHead)
    assert make_head(d, HeadSpec("entailment", 3)).net[-1].out_features == 3
    with pytest.raises(ValueError, match="unknown task"):
        make_head(d, HeadSpec("caption", 3))

    g = torch.Generator().manual_seed(0)
    enc = tok(["both images have a red circle", "the red circle is big"], padding="max_length", max_length=12,
              return_tensors="pt", return_token_type_ids=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    px = torch.rand(2, 2, 3, 48, 48, generator=g) * 2 - 1
    pair = pooled_features(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": px})
    assert pair.shape == (2, 2, d)
    for j in range(2):
        alone = pooled_features(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": px[:, j]})
        assert torch.allclose(pair[:, j], alone, atol=1e-5)
    # candidates: (B, k, L) texts with one image each
    cand = torch.stack([ids, ids.flip(0)], dim=1)
    cmask = torch.stack([mask, mask.flip(0)], dim=1)
    choice = pooled_features(model, {"input_ids": cand, "attention_mask": cmask, "pixel_values": px[:, 0]})
    assert choice.shape == (2, 2, d)
    alone = pooled_features(model, {"input_ids": cand[:, 1], "attention_mask": cmask[:, 1], "pixel_values": px[:, 0]})
    assert torch.allclose(choice[:, 1], alone, atol=1e-5)
    assert ChoiceHead(d).eval()(choice).shape == (2, 2)


@pytest.fixture(scope="module")
def task_run(tiny_backbone_dir, tmp_path_factory):
    from feddat.config import RunConfig

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("task-run")
    cfg = RunConfig(benchmark="task", model_path=str(tiny_backbone_dir), cache_dir=str(root / "cache"), rounds=2,
                    train_per_client=32, val_per_client=8, test_per_client=24, batch_size=16, threads=1,
                    reduction=4).validate()
    results = run(cfg, out_dir=root / "run", progress=False)
    return cfg, root, results


def test_task_run_reports_each_clients_task_metric_and_head(task_run):
    cfg, root, results = task_run
    assert results["tasks"] == {"vqa": {"task": "vqa", "metric": "vqa-score"},
                                "pair": {"task": "pair", "metric": "accuracy"},
                                "entailment": {"task": "entailment", "metric": "accuracy"},
                                "choice": {"task": "choice", "metric": "accuracy"}}
    assert results["label_spaces"]["entailment"] == ["contradiction", "entailment", "neutral"]
    assert results["label_spaces"]["pair"] == ["false", "true"]
    assert results["label_spaces"]["choice"] == ["A", "B", "C", "D"]
    assert all(0.0 <= v <= 1.0 for v in results["final"]["clients"].values())
    d = 32
    heads = {c: {k: tuple(v.shape) for k, v in load_file(root / "run" / "clients" / c / "model.safetensors").items()
                 if k.startswith("head.")} for c in results["clients"]}
    assert heads["pair"]["head.net.0.weight"] == (2 * d, 2 * d) and heads["pair"]["head.net.3.weight"] == (2, 2 * d)
    assert heads["entailment"]["head.net.0.weight"] == (2 * d, d) and heads["entailment"]["head.net.3.weight"] == (3, 2 * d)
    assert heads["choice"] == {"head.net.1.weight": (1, d), "head.net.1.bias": (1,)}
    n_vqa = len(results["label_spaces"]["vqa"])
    assert heads["vqa"]["head.net.3.weight"] == (n_vqa, 2 * d)
    meta = json.loads((root / "run" / "clients" / "choice" / "client.json").read_text())
    assert meta["head"]["task"] == "choice"


def test_task_clients_are_scored_by_their_own_loss(task_run):
    """The VQA client's labels are soft scores (BCE, VQA score), the others' class indices (cross-entropy)."""
    from feddat.data.clients import load_benchmark
    from feddat.data.sizes import Sizes

    cfg, root, _ = task_run
    _, tok = load_backbone(cfg.model_path)
    clients = {c.name: c for c in load_benchmark("task", 0, Sizes(32, 8, 24), tok, 12, Path(cfg.cache_dir))}
    vqa = clients["vqa"].train.labels
    assert vqa.is_floating_point() and vqa.shape[1] == len(clients["vqa"].answers)
    assert {round(v, 4) for v in torch.unique(vqa).tolist()} <= {0.0, 0.3, 0.6, 0.9, 1.0} and (vqa.max(1).values > 0).all()
    assert clients["entailment"].train.labels.dtype == torch.int64
    assert set(clients["entailment"].train.labels.tolist()) == {0, 1, 2}
    assert clients["pair"].train.image_index2 is not None
    assert clients["choice"].train.input_ids.shape[1] == 4


def test_predict_and_eval_on_pair_and_choice_clients(task_run, capsys):
    """predict on a test item of each client returns the answer the run's evaluation scored; eval --run
    reproduces the run's per-client scores."""
    from feddat.inference import load_client

    cfg, root, results = task_run
    recs = client_records("task", cfg.seed, cfg.sizes, Path(cfg.cache_dir))
    pair = load_client(root / "run", "pair")
    r = recs["pair"]["test"]
    left, right = [r.images[i] for i in r.image_index], [r.images[i] for i in r.image_index2]
    preds = pair.predict(left, r.questions, images2=right, top_k=1)
    logits = pair.logits(left, r.questions, images2=right)
    assert [p[0][0] for p in preds] == [pair.answers[int(i)] for i in logits.argmax(-1)]
    acc = np.mean([p[0][0] == a for p, a in zip(preds, r.answers)])
    assert acc == pytest.approx(results["final"]["clients"]["pair"], abs=1e-6)
    with pytest.raises(FedDATError, match="second image"):
        pair.predict(left[:1], r.questions[:1])

    choice = load_client(root / "run", "choice")
    r = recs["choice"]["test"]
    images = [r.images[i] for i in r.image_index]
    preds = choice.predict(images, r.questions, candidates=r.candidates, top_k=4)
    assert all(sorted(a for a, _ in p) == sorted(c) for p, c in zip(preds, r.candidates))
    acc = np.mean([p[0][0] == a for p, a in zip(preds, r.answers)])
    assert acc == pytest.approx(results["final"]["clients"]["choice"], abs=1e-6)
    with pytest.raises(FedDATError, match="chooses among 4"):
        choice.predict(images[:1], r.questions[:1], candidates=[["red", "blue"]])

    assert main(["eval", "--run", str(root / "run"), "--out", str(root / "eval"), "--quiet"]) == 0
    again = json.loads((root / "eval" / "eval.json").read_text())
    assert again["final"]["clients"] == results["final"]["clients"]
    assert again["tasks"] == results["tasks"]


def test_predict_cli_takes_pair_and_candidate_fields(task_run, tmp_path, capsys):
    from PIL import Image

    cfg, root, _ = task_run
    recs = client_records("task", cfg.seed, cfg.sizes, Path(cfg.cache_dir))
    r = recs["choice"]["test"]
    Image.fromarray(r.images[r.image_index[0]]).save(tmp_path / "a.png")
    capsys.readouterr()
    assert main(["predict", "--run", str(root / "run"), "--client", "choice", "--image", str(tmp_path / "a.png"),
                 "--question", r.questions[0], "--candidates", "|".join(r.candidates[0]), "--top-k", "4"]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert sorted(printed) == sorted(c.split()[0] for c in r.candidates[0])
    p = recs["pair"]["test"]
    Image.fromarray(p.images[p.image_index[0]]).save(tmp_path / "l.png")
    Image.fromarray(p.images[p.image_index2[0]]).save(tmp_path / "r.png")
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": "l.png", "image2": "r.png", "question": p.questions[0]}) + "\n")
    assert main(["predict", "--run", str(root / "run"), "--client", "pair", "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl"), "--quiet"]) == 0
    out = json.loads((tmp_path / "out.jsonl").read_text())
    assert sorted(out["answers"]) == ["false", "true"]


def test_task_benchmark_refuses_partitioning(tmp_path):
    from feddat.data.sizes import Sizes
    from feddat.data.partition import Partition

    with pytest.raises(FedDATError, match="cannot be partitioned"):
        client_records("task", 0, Sizes(8, 4, 8), tmp_path, Partition("iid", 4))


def test_partitioning_keeps_the_annotators_answers():
    from feddat.data.sizes import Sizes
    from feddat.data.partition import partition_records, Partition

    recs = client_records("task", 0, Sizes(30, 10, 30))
    parts = partition_records({"a": recs["vqa"], "b": recs["vqa"]}, Partition("iid", 3), 0, Sizes(30, 10, 30))
    for splits in parts.values():
        for r in splits.values():
            assert len(r.annotator_answers) == len(r) and all(len(a) == 10 for a in r.annotator_answers)
            assert all(consensus(a) == ans for a, ans in zip(r.annotator_answers, r.answers))


def test_task_records_are_deterministic_and_cached(tmp_path):
    from feddat.data.sizes import Sizes

    sizes = Sizes(12, 4, 12)
    fresh = client_records("task", 3, sizes)
    cached_once = client_records("task", 3, sizes, tmp_path)
    cached_twice = client_records("task", 3, sizes, tmp_path)  # read back from the cache file
    assert len(list(tmp_path.glob("task-*.npz"))) == 1
    for c in fresh:
        for split in ("train", "val", "test"):
            for r in (cached_once[c][split], cached_twice[c][split]):
                a = fresh[c][split]
                assert np.array_equal(a.images, r.images) and a.questions == r.questions and a.answers == r.answers
                assert a.task == r.task and a.candidates == r.candidates
                assert a.annotator_answers == r.annotator_answers
                assert (a.image_index2 is None) == (r.image_index2 is None)
                if a.image_index2 is not None:
                    assert np.array_equal(a.image_index2, r.image_index2)
    other = client_records("task", 4, sizes)
    assert other["pair"]["train"].questions != fresh["pair"]["train"].questions


def test_split_sizes_default_to_the_benchmarks_own(capsys):
    """0 (the default) takes the benchmark's sizes: Task's clients half the items of the others (its items cost
    two backbone passes on average); given sizes are kept, for every way a config arrives."""
    from feddat.config import RunConfig
    from feddat.data.benchmarks import default_sizes
    from feddat.data.sizes import Sizes
    from feddat.federation.flower.records import config_from_values

    assert default_sizes("task") == Sizes(200, 100, 500) and default_sizes("domain") == Sizes(400, 200, 1000)
    assert RunConfig(benchmark="task").validate().sizes == Sizes(200, 100, 500)
    assert RunConfig(benchmark="scene").validate().sizes == Sizes(400, 200, 1000)
    assert RunConfig(benchmark="task", test_per_client=64).validate().sizes == Sizes(200, 100, 64)
    tomled, _ = config_from_values({"benchmark": "task", "train-per-client": 0, "val-per-client": 0,
                                    "test-per-client": 0})
    assert tomled.sizes == Sizes(200, 100, 500)
    with pytest.raises(FedDATError, match=r"val-per-client must be a positive integer \(or 0"):
        RunConfig(benchmark="task", val_per_client=-3).validate()
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "task's 200/100/500" in capsys.readouterr().out


def test_pooled_run_on_task_counts_each_tasks_raw_data(tiny_config):
    """The centralised reference on Task: soft-scored VQA labels, image pairs and candidate lists all count in
    the raw data its clients would have to send (each image once, the second of a pair too)."""
    from feddat.data.benchmarks import client_records

    cfg = tiny_config(benchmark="task", method="centralised-adapter", rounds=1, train_per_client=8,
                      val_per_client=4, test_per_client=8)
    res = run(cfg, progress=False)
    raw = res["communication"]["raw_data_bytes"]
    recs = {c: s["train"] for c, s in client_records("task", cfg.seed, cfg.sizes, Path(cfg.cache_dir)).items()}
    for name, r in recs.items():
        used = set(r.image_index.tolist()) | set(r.image_index2.tolist() if r.image_index2 is not None else [])
        expected = len(used) * 3 * 48 * 48 + sum(len(q.encode()) for q in r.questions)
        if name == "choice":
            expected += sum(len(c.encode()) for cands in r.candidates for c in cands) + len(r.questions)  # "A".."D"
        elif name == "vqa":
            labels = res["label_spaces"][name]
            expected += sum(len(a.encode()) for ann in r.annotator_answers for a in set(ann) if a in labels)
        else:
            expected += sum(len(a.encode()) for a in r.answers)
        assert raw[name] == expected, name
