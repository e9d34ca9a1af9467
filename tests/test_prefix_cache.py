"""The frozen prefix kept per split (feddat.models.vl.PrefixCache): the rows it gives are those a pass over the
batch computes, runs give the same numbers with and without it, it keeps within its budget, and methods that
train or hook the backbone below the first adapter never use it."""

import json
from dataclasses import replace

import pytest
import torch

from feddat.errors import FedDATError
from feddat.federation.inprocess import build, run
from feddat.models.backbone import LayerCall, encode_until


def _numbers(results: dict) -> tuple:
    """Every client's final scores (test and validation, every view, per question type) and each round's
    training losses."""
    return results["final"], [r["train"] for r in results["rounds"]]


def test_rows_and_cat_give_the_call_of_those_rows(tiny_config):
    setup = build(tiny_config(benchmark="domain"))
    split, bb = setup.clients[0].train, setup.worker.model.backbone
    whole = split.batch(torch.arange(len(split)))
    call = encode_until(bb, whole["input_ids"], whole["attention_mask"], whole["pixel_values"], 1)
    halves = [split.batch(torch.arange(0, 20)), split.batch(torch.arange(20, len(split)))]
    joined = LayerCall.cat([encode_until(bb, b["input_ids"], b["attention_mask"], b["pixel_values"], 1)
                            for b in halves])
    assert torch.equal(joined.hidden, call.hidden)
    assert all(torch.equal(a, b) for a, b in zip(joined.args, call.args) if torch.is_tensor(a))
    idx = torch.tensor([7, 3, 30, 3])
    part = split.batch(idx)
    alone = encode_until(bb, part["input_ids"], part["attention_mask"], part["pixel_values"], 1)
    picked = call.rows(idx)
    assert torch.allclose(picked.hidden, alone.hidden, atol=1e-6)
    assert [type(a) for a in picked.args] == [type(a) for a in alone.args]
    assert all(torch.equal(a, b) for a, b in zip(picked.args, alone.args) if torch.is_tensor(a))


@pytest.mark.parametrize("benchmark,method", [("domain", "feddat"), ("domain", "centralised-adapter"),
                                              ("task", "apfl-adapter")])
def test_a_run_gives_the_same_numbers_with_and_without_the_cache(tiny_config, benchmark, method):
    """Task's clients include image pairs and multiple choice (several backbone rows per item)."""
    cfg = tiny_config(benchmark=benchmark, method=method, rounds=2, eval_every=1)
    setup = build(cfg)
    assert setup.worker.prefix_cache is not None
    cached = run(cfg, progress=False)
    plain = run(replace(cfg, prefix_cache_mb=0).validate(), progress=False)
    assert _numbers(cached) == _numbers(plain)


def test_the_worker_batch_carries_the_prefix_and_views_are_kept(tiny_config):
    setup = build(tiny_config(benchmark="task"))
    worker = setup.worker
    pair = next(c for c in setup.clients if c.task == "pair").train
    worker.model.set_views(("student", "teacher"))
    batch = worker.batch(pair, torch.tensor([4, 1]))
    assert worker.model.view == "student+teacher"  # computing the prefix leaves the caller's view as it was
    assert batch["prefix"].hidden.shape[0] == 4      # two images per statement
    flat = pair.batch(torch.tensor([1]))
    px = flat["pixel_values"][0]                     # the second row pair is statement 1's two images
    worker.model.set_view("none")
    call = encode_until(worker.model.backbone, flat["input_ids"].repeat(2, 1), flat["attention_mask"].repeat(2, 1),
                        px, 1)
    assert torch.allclose(batch["prefix"].hidden[2:], call.hidden, atol=1e-6)


def test_the_cache_keeps_within_its_budget(tiny_config):
    setup = build(tiny_config(benchmark="domain", prefix_cache_mb=1))
    worker, client = setup.worker, setup.clients[0]
    cache = worker.prefix_cache
    for split in (client.train, client.val, client.test):
        worker.batch(split, torch.arange(4))
    assert 0 < cache.used <= 1 << 20
    cache.budget = cache.used + 1  # the next split does not fit: it is computed batch by batch, not kept
    batch = worker.batch(setup.clients[1].train, torch.arange(4))
    assert "prefix" not in batch and cache.used < cache.budget


@pytest.mark.parametrize("method", ["fedavg-lora", "fedavg-prompt", "fedavg-bitfit", "fedavg-full"])
def test_methods_that_train_the_backbone_do_not_cache(tiny_config, method):
    setup = build(tiny_config(method=method))
    assert setup.worker.prefix_cache is None
    assert "prefix" not in setup.worker.batch(setup.clients[0].train, torch.arange(2))


def test_off_and_bad_values(tiny_config):
    assert build(tiny_config(prefix_cache_mb=0)).worker.prefix_cache is None
    for bad in (-1, 1.5, True):
        with pytest.raises(FedDATError, match="prefix-cache-mb"):
            tiny_config(prefix_cache_mb=bad)


def test_bench_times_both_and_checks_the_results(tiny_backbone_dir, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "prefix_cache.py"
    spec = importlib.util.spec_from_file_location("prefix_cache_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--out", str(tmp_path / "out"), "--benchmark", "domain", "--methods", "feddat", "--rounds", "1",
                     "--eval-every", "1", "--sizes", "16,8,16", "--model-path", str(tiny_backbone_dir)])
    row = json.loads((tmp_path / "out" / "prefix_cache.json").read_text())["rows"][0]
    assert rc == 0 and row["same_results"] and row["seconds_on"] > 0 and row["seconds_off"] > 0
    assert "| feddat |" in (tmp_path / "out" / "prefix_cache.md").read_text()


def test_a_split_that_is_gone_frees_its_memory(tiny_config):
    import copy
    import gc

    setup = build(tiny_config(benchmark="domain"))
    worker = setup.worker
    worker.batch(setup.clients[0].train, torch.arange(2))
    kept = worker.prefix_cache.used
    other = copy.deepcopy(setup.clients[1].train)
    assert "prefix" in worker.batch(other, torch.arange(2)) and worker.prefix_cache.used > kept
    del other
    gc.collect()
    assert worker.prefix_cache.used == kept and len(worker.prefix_cache._calls) == 1


def test_a_kept_prefix_spares_a_client_folder_decoding_its_images(tiny_config, tmp_path):
    """A client folder decodes images per batch: once its split's prefix is kept, the worker's batches carry no
    images and decode none (an image-pair client's too), and scores equal those without the cache."""
    from feddat.cli import main
    from feddat.data.lazy import ImageTable

    export = tmp_path / "clients"
    assert main(["data", "--benchmark", "task", "--export", str(export), "--cache-dir", str(tmp_path / "gen"),
                 "--train-per-client", "16", "--val-per-client", "4", "--test-per-client", "8"]) == 0
    cfg = tiny_config(clients_dir=str(export), rounds=1, benchmark="domain")
    setup = build(cfg)
    worker = setup.worker
    pair = next(c for c in setup.clients if c.task == "pair").train
    worker.batch(pair, torch.tensor([0]))                     # computes and keeps the split's prefix
    loads = []
    real_load = ImageTable.load
    ImageTable.load = lambda self, rows: loads.append(len(rows)) or real_load(self, rows)
    try:
        batch = worker.batch(pair, torch.tensor([3, 1]))
    finally:
        ImageTable.load = real_load
    assert loads == [] and "pixel_values" not in batch and batch["prefix"].hidden.shape[0] == 4
    assert _numbers(run(cfg, progress=False)) == _numbers(run(replace(cfg, prefix_cache_mb=0).validate(),
                                                                progress=False))
