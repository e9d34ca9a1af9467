"""The Function and Scene benchmarks, `feddat data`, the loader's vocabulary extension, and Domain unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict

import numpy as np
import pytest

from feddat.cli import main
from feddat.data.benchmarks import BENCHMARKS, client_records
from feddat.data.function import FUNCTIONS, MATERIALS, USES, holds, logic_answer
from feddat.data.questions import EXTRA_WORDS, WORDS
from feddat.data.report import js_divergence
from feddat.data.scene import GENERATOR, _background, render_scene, scene_clients
from feddat.data.sizes import Sizes
from feddat.data.world import COLORS, IMAGE_SIZE, RGB, SHAPES, Obj, Scene

SMALL = Sizes(40, 10, 30)


def _digest(benchmark: str, seed: int, sizes: Sizes) -> str:
    h = hashlib.sha256()
    for client, splits in client_records(benchmark, seed, sizes).items():
        for split in ("train", "val", "test"):
            r = splits[split]
            h.update(f"{client}/{split}".encode())
            for a in (r.images, r.image_index, r.patch_colors, r.patch_shapes):
                h.update(a.tobytes())
            h.update("\n".join(r.questions + r.answers + r.qtypes).encode())
            h.update(bytes(r.shifted + r.synonym))
    return h.hexdigest()


# Recorded from the code before the Function and Scene benchmarks were added.
DOMAIN_DIGESTS = {
    "domain": "0a19c7dbb08fb28fe881d4fd7adefb4a006899441b41a3d63165f5c05fd690d5",
    "domain-noskill": "3466dbd89a2fcca687ea7df9a1b7b624dc19904113f2af337d6bacdec2c52356",
    "domain-noshift": "45b8fb12915dfbec440d1147408d1f6e360ce9ae578c89499c30401adb232df8",
}


@pytest.mark.parametrize("benchmark", list(DOMAIN_DIGESTS))
def test_domain_records_are_unchanged(benchmark):
    assert _digest(benchmark, 0, SMALL) == DOMAIN_DIGESTS[benchmark]


@pytest.mark.integration
def test_domain_records_at_default_sizes_are_unchanged():
    assert _digest("domain", 0, Sizes()) == "84a1d52299971300c9527fb7bee187cf23a5aa3cff1f3469211707c0c44b7e7a"


@pytest.fixture(scope="module")
def function_recs():
    return client_records("function", 0, SMALL)


@pytest.fixture(scope="module")
def scene_recs():
    return client_records("scene", 0, SMALL)


@pytest.mark.parametrize("benchmark", ["function", "scene"])
def test_same_seed_same_records_other_seed_other_records(benchmark):
    a, b, c = (_digest(benchmark, s, SMALL) for s in (0, 0, 1))
    assert a == b and a != c


def test_sizes_and_clients(function_recs, scene_recs):
    assert list(function_recs) == list(FUNCTIONS)
    assert list(scene_recs) == ["shop", "workplace", "home", "transport", "sport", "outdoors"]
    for recs in (function_recs, scene_recs):
        for splits in recs.values():
            assert [len(splits[s]) for s in ("train", "val", "test")] == [40, 10, 30]


def test_questions_fit_the_backbone_and_use_known_words(function_recs, scene_recs):
    known = set(WORDS) | set(EXTRA_WORDS)
    for recs in (function_recs, scene_recs):
        for splits in recs.values():
            for r in splits.values():
                for q in r.questions:
                    assert len(q.split()) <= 10 and set(q.split()) <= known, q


def _scene_objects(r, k) -> list[Obj]:
    """The objects of record k's scene, read back from its per-cell colour and shape labels (sizes unknown)."""
    img = r.image_index[k]
    return [Obj(COLORS[c - 1], SHAPES[s - 1], "?", cell // 4, cell % 4)
            for cell, (c, s) in enumerate(zip(r.patch_colors[img], r.patch_shapes[img])) if c]


def _find(objs, color, shape):
    (o,) = [o for o in objs if o.color == color and o.shape == shape]
    return o


def test_every_function_client_asks_its_own_function(function_recs):
    for name, qtypes in FUNCTIONS.items():
        assert set(function_recs[name]["train"].qtypes) == set(qtypes)


def test_relation_answers_follow_the_scene_geometry(function_recs):
    r = function_recs["relation"]["train"]
    answers = {"yes": 0, "no": 0}
    for k, (q, a, t) in enumerate(zip(r.questions, r.answers, r.qtypes)):
        w = q.split()  # is the C1 S1 <relation words> the C2 S2 ?
        objs = _scene_objects(r, k)
        first, second = _find(objs, w[2], w[3]), _find(objs, w[-3], w[-2])
        assert a == ("yes" if holds(t, first, second) else "no"), q
        answers[a] += 1
    assert min(answers.values()) >= 10  # both answers common


def test_relations_on_a_hand_made_scene():
    a, b, c = Obj("red", "circle", "big", 0, 0), Obj("blue", "square", "big", 1, 1), Obj("green", "cross", "big", 3, 0)
    assert holds("left", a, b) and not holds("left", b, a) and not holds("left", a, c)
    assert holds("above", a, c) and not holds("above", c, b)
    assert holds("next", a, b) and not holds("next", a, c)
    assert [logic_answer(op, True, False) for op in ("and", "or", "not")] == [False, True, True]


def test_logic_answers_follow_the_scene(function_recs):
    r = function_recs["logic"]["train"]
    for k, (q, a, t) in enumerate(zip(r.questions, r.answers, r.qtypes)):
        objs = _scene_objects(r, k)
        body = q.split()[3:-1]  # after "is there a", before "?"
        cut = body.index("and" if t != "or" else "or")
        left, right = body[:cut], [w for w in body[cut + 1:] if w not in ("a", "not")]

        def present(words):
            if words[-1] == "thing":
                return any(o.color == words[0] for o in objs)
            return any(o.shape == words[0] for o in objs)

        assert a == ("yes" if logic_answer(t, present(left), present(right)) else "no"), q


def test_knowledge_answers_follow_the_fact_table(function_recs):
    r = function_recs["knowledge"]["train"]
    for k, (q, a, t) in enumerate(zip(r.questions, r.answers, r.qtypes)):
        objs = _scene_objects(r, k)
        word = q.split()[3]
        if t == "use":  # what is the COLOR thing used for ?
            (o,) = [o for o in objs if o.color == word]
            assert a == USES[o.shape]
        else:           # what is the SHAPE made of ?
            (o,) = [o for o in objs if o.shape == word]
            assert a == MATERIALS[o.color]


def test_recognition_answers_name_the_object_in_the_cell(function_recs):
    r = function_recs["recognition"]["train"]
    for k, (q, a) in enumerate(zip(r.questions, r.answers)):
        w = q.split()
        row, col = int(w[w.index("row") + 1]) - 1, int(w[w.index("column") + 1]) - 1
        (o,) = [o for o in _scene_objects(r, k) if (o.row, o.col) == (row, col)]
        assert a in (o.color, o.shape, f"{o.color} {o.shape}")


def test_scene_clients_differ_in_background_and_vocabulary(scene_recs):
    specs = scene_clients()
    backgrounds = [np.asarray(_background(s.name), dtype=float) for s in specs]
    for i in range(len(backgrounds)):
        for j in range(i + 1, len(backgrounds)):
            assert np.abs(backgrounds[i] - backgrounds[j]).mean() > 10
    # a corner pixel of every image is close to the client's own background, farther from the others'
    strays = 0
    for i, s in enumerate(specs):
        img = scene_recs[s.name]["test"].images.astype(float)
        corner = img[:, :2, :2].reshape(len(img), -1, 3).mean(axis=(0, 1))
        dists = [np.abs(corner - b[:2, :2].reshape(-1, 3).mean(axis=0)).mean() for b in backgrounds]
        assert int(np.argmin(dists)) == i
        # objects come mostly from the scene's own vocabulary; now and then one from the whole world
        vocab = set(s.vocabulary())
        r = scene_recs[s.name]["train"]
        objs = [(o.color, o.shape) for k in range(len(r)) for o in _scene_objects(r, k)]
        inside = sum(o in vocab for o in objs)
        assert inside / len(objs) > 0.85
        strays += len(objs) - inside
    assert strays > 0
    assert len({frozenset(s.vocabulary()) for s in specs}) == len(specs)


def test_scene_objects_co_occur_by_group():
    spec = scene_clients()[0]
    vocab = set(spec.vocabulary())
    rng = np.random.default_rng(0)
    same = total = 0
    for _ in range(300):
        groups = [spec.group_of(o.color, o.shape) for o in spec.sample(rng).objects if (o.color, o.shape) in vocab]
        same += sum(a == b for i, a in enumerate(groups) for b in groups[i + 1:])
        total += len(groups) * (len(groups) - 1) // 2
    # 1/3 if objects were drawn independently of each other; a group holds 4 distinct objects and a scene up to
    # 7, so larger scenes spill over into the other groups (about 0.51 for seed 0)
    assert same / total > 0.45


def test_scene_records_at_the_same_sizes_are_cached_under_the_generator_version():
    # the generator's version is part of every spec, so of the cache key: a new generator never reads old files
    assert all(asdict(s)["generator"] == GENERATOR for s in scene_clients())


def _clean(spec, **kw):
    """The spec without per-pixel noise and blur, so that what is drawn can be read back exactly."""
    return dataclasses.replace(spec, noise=0.0, blur=0.0, **kw)


def test_scene_clutter_is_camouflage_in_the_scenes_own_object_colours():
    for s in scene_clients():
        rng = np.random.default_rng(0)
        pixels = np.stack([_clean(s).render(Scene(()), rng) for _ in range(20)]).astype(int).reshape(-1, 3)
        near = {c: int((np.abs(pixels - np.asarray(RGB[c])).max(axis=1) <= 40).sum()) for c in COLORS}
        # an image without objects holds plenty of pixels of at least two of the scene's own object colours
        assert sum(near[c] >= 100 for c in s.colors) >= 2, (s.name, near)
        assert set(s.clutter_colors or s.colors) <= set(COLORS)


def test_scene_clutter_is_never_object_shaped():
    # one mark at a time on an empty scene: no 3 x 3 block is ever covered (the smallest object is 7 x 7)
    for s in scene_clients():
        spec = _clean(s, clutter_n=(1, 1), occluders=(0, 0))
        bg = np.asarray(_background(s.name), dtype=int)
        rng = np.random.default_rng(1)
        for _ in range(200):
            m = np.abs(spec.render(Scene(()), rng).astype(int) - bg).sum(axis=2) > 0
            block = np.ones_like(m[2:, 2:])
            for dy in range(3):
                for dx in range(3):
                    block &= m[dy:dy + 46, dx:dx + 46]
            assert not block.any(), s.name


def test_scene_types_hide_objects_to_different_degrees():
    # the same objects, without clutter, jitter, noise or blur: how far an object's centre is from the backdrop
    scene = Scene((Obj("red", "square", "big", 1, 1), Obj("blue", "circle", "big", 2, 2),
                   Obj("yellow", "diamond", "big", 0, 3)))
    stand_out = {}
    for s in scene_clients():
        spec = _clean(s, jitter=0.0, clutter_n=(0, 0), occluders=(0, 0))
        img = spec.render(scene, np.random.default_rng(0)).astype(float)
        bg = np.asarray(_background(s.name), dtype=float)
        stand_out[s.name] = np.mean([np.abs(img - bg)[o.row * 12 + 5:o.row * 12 + 7, o.col * 12 + 5:o.col * 12 + 7].mean()
                                     for o in scene.objects])
    assert max(stand_out.values()) > 1.3 * min(stand_out.values()), stand_out
    assert min(stand_out, key=stand_out.get) == "transport"  # dim objects on asphalt
    # and each scene type strews its own clutter, under one of several viewing conditions
    specs = scene_clients()
    assert len({s.clutter for s in specs}) == len(specs)
    assert len({(s.contrast, s.blur, s.noise) for s in specs}) >= 4


def test_render_scene_draws_a_scene_type_and_refuses_an_unknown_one():
    scene = Scene((Obj("red", "square", "big", 1, 1),))
    a = render_scene(scene, "home", np.random.default_rng(0))
    b = render_scene(scene, "home", np.random.default_rng(0))
    assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8 and (a == b).all()
    with pytest.raises(ValueError, match="unknown scene type"):
        render_scene(scene, "moon", np.random.default_rng(0))


def test_js_divergence_by_hand():
    assert js_divergence({"a": 1}, {"a": 5}) == 0
    assert js_divergence({"a": 1}, {"b": 1}) == pytest.approx(1.0)
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = (KL(p||m) + KL(q||m)) / 2
    expected = (0.5 * np.log2(0.5 / 0.75) + 0.5 * np.log2(0.5 / 0.25) + np.log2(1 / 0.75)) / 2
    assert js_divergence({"a": 1, "b": 1}, {"a": 2}) == pytest.approx(expected)


@pytest.mark.parametrize("benchmark", ["function", "scene"])
def test_feddat_data_writes_sheets_and_stats(benchmark, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["data", "--benchmark", benchmark, "--out", str(out), "--seed", "1", "--train-per-client", "20",
               "--val-per-client", "6", "--test-per-client", "14", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    names = [s.name for s in BENCHMARKS[benchmark]()]
    assert list(stats["clients"]) == names
    for n in names:
        c = stats["clients"][n]
        assert c["sizes"] == {"train": 20, "val": 6, "test": 14}
        assert sum(c["answers"].values()) == sum(c["qtypes"].values()) == 40
        assert (out / f"samples_{n}.png").stat().st_size > 1000
    js = stats["divergence"]["qtypes_js"]
    assert all(js[n][n] == 0 for n in names)
    if benchmark == "function":  # clients ask disjoint question types
        assert stats["divergence"]["mean_qtypes_js"] == pytest.approx(1.0)
    else:                        # the same templates everywhere
        assert stats["divergence"]["mean_qtypes_js"] < 0.2
    printed = capsys.readouterr().out
    assert "Jensen-Shannon" in printed and names[-1] in printed


def test_feddat_data_refuses_an_unknown_benchmark(tmp_path, capsys):
    assert main(["data", "--benchmark", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_loader_gives_new_words_their_own_embeddings(tiny_backbone_dir):
    from feddat.models.backbone import load_backbone

    model, tok = load_backbone(tiny_backbone_dir)
    assert len(tok) == model.config.vocab_size == model.get_input_embeddings().num_embeddings
    ids = tok("is the red circle left of the blue square ?")["input_ids"]
    assert tok.unk_token_id not in ids
    vocab = tok.get_vocab()
    assert [vocab[w] for w in sorted(set(WORDS))] == sorted(vocab[w] for w in set(WORDS))  # old ids kept
    emb = model.get_input_embeddings().weight
    new = emb[[vocab[w] for w in EXTRA_WORDS]]
    old = emb[[vocab[w] for w in WORDS]]
    assert new.norm(dim=1).mean() == pytest.approx(old.norm(dim=1).mean().item(), rel=1e-4)
    again, _ = load_backbone(tiny_backbone_dir)  # the draw is the same every time
    assert (again.get_input_embeddings().weight == emb).all()


@pytest.mark.integration
@pytest.mark.parametrize("benchmark", ["function", "scene"])
def test_a_tiny_run_on_each_new_benchmark(benchmark, tiny_config):
    from feddat.federation.inprocess import run

    cfg = tiny_config(benchmark=benchmark, rounds=1, method="feddat")
    data = run(cfg, progress=False)
    assert list(data["final"]["clients"]) == [s.name for s in BENCHMARKS[benchmark]()]
    assert 0 <= data["final"]["avg_score"] <= 1


@pytest.mark.integration
def test_the_shipped_backbone_runs_the_new_benchmarks(tmp_path):
    from feddat.config import RunConfig
    from feddat.federation.inprocess import run

    for benchmark in ("function", "scene"):
        cfg = RunConfig(benchmark=benchmark, rounds=1, train_per_client=32, val_per_client=8, test_per_client=32,
                        threads=1, cache_dir=str(tmp_path / "cache")).validate()
        data = run(cfg, progress=False)
        assert len(data["final"]["clients"]) == len(BENCHMARKS[benchmark]())


def test_background_is_image_sized():
    assert _background("outdoors").size == (IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match="unknown scene type"):
        _background("moon")


@pytest.mark.integration
def test_the_flower_engine_runs_a_new_benchmark(tiny_config):
    from feddat.federation.flower.server_app import run_flower

    cfg = tiny_config(benchmark="function", rounds=1, method="feddat", engine="flower")
    data = run_flower(cfg, out_dir=None, progress=False)
    assert list(data["final"]["clients"]) == list(FUNCTIONS)


def test_a_client_whose_data_leave_a_split_empty_is_named(monkeypatch, tmp_path):
    """Real data too small for the validation split: a one-line error naming the client and the fix, not an
    IndexError from the tokenizer."""
    from feddat.data import benchmarks, clients
    from feddat.data.sizes import Sizes
    from feddat.errors import FedDATError

    recs = benchmarks.client_records("domain", 0, Sizes(8, 4, 8), tmp_path)
    first = next(iter(recs))
    recs[first]["val"].questions = []  # what a too-small real dataset leaves for the split
    monkeypatch.setattr(clients, "client_records", lambda *a, **k: recs)
    with pytest.raises(FedDATError, match=f"client {first} has no val questions.*--val-per-client"):
        clients.load_benchmark("domain", 0, Sizes(8, 4, 8), None, 12, tmp_path)
    assert not (tmp_path / "clients").exists() or not any((tmp_path / "clients").iterdir())  # nothing half-written
