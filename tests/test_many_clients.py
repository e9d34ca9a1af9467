"""Many clients: client sampling, partitioned benchmarks, private state on disk, both engines alike."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from feddat.config import RunConfig
from feddat.data.benchmarks import client_records
from feddat.data.partition import Partition, partition_client_names, split_sizes
from feddat.data.sizes import Sizes
from feddat.errors import FedDATError
from feddat.config import round_size
from feddat.federation.sampling import sample_clients


# ----- sampling -----
def test_round_size_counts_and_fractions():
    assert round_size(10, 0) == 10
    assert round_size(10, 3) == 3
    assert round_size(10, 0.25) == 3     # 2.5 rounds up
    assert round_size(10, 0.01) == 1     # at least one
    assert round_size(10, 1.0) == 10
    assert round_size(100, 0.1) == 10


def test_sampling_is_a_function_of_seed_and_round():
    a = [sample_clients(7, r, 100, 10) for r in range(5)]
    assert a == [sample_clients(7, r, 100, 10) for r in range(5)]
    assert all(len(s) == 10 == len(set(s)) and s == sorted(s) and 0 <= s[0] and s[-1] < 100 for s in a)
    assert len({tuple(s) for s in a}) == 5                      # rounds differ
    assert a[0] != sample_clients(8, 0, 100, 10)                # seeds differ
    assert sample_clients(7, 3, 5, 5) == list(range(5))          # all: no draw


@pytest.mark.parametrize("values, message", [
    (dict(clients_per_round=6), "clients-per-round must be a count from 1 to the run's 5"),
    (dict(clients_per_round=1.5), r"fraction must be in \(0, 1\]"),
    (dict(clients_per_round=-1), "clients-per-round"),
    (dict(clients_per_round="3"), "clients-per-round"),
    (dict(clients_per_round=2, min_clients=3), "min-clients must be an integer from 1 to the 2 clients of a round"),
    (dict(partition="striped"), "unknown partition 'striped'"),
    (dict(partition="iid"), "partition iid needs num-clients >= 1"),
    (dict(num_clients=10), "num-clients applies to a partitioned benchmark"),
    (dict(partition="dirichlet", num_clients=10, partition_alpha=0.0), "partition-alpha"),
    (dict(partition="pathological", num_clients=10, partition_classes=0), "partition-classes"),
    (dict(partition="iid", num_clients=10, clients_per_round=11), "1 to the run's 10 clients"),
])
def test_bad_sampling_and_partition_options_are_refused(values, message):
    with pytest.raises(FedDATError, match=message):
        RunConfig(**values).validate()


def test_cli_takes_a_count_or_a_fraction():
    from feddat.cli import _count_or_fraction

    assert _count_or_fraction("10") == 10 and isinstance(_count_or_fraction("10"), int)
    assert _count_or_fraction("0.1") == 0.1
    cfg = RunConfig(partition="dirichlet", num_clients=100, clients_per_round=0.1).validate()
    assert cfg.round_size() == 10 and len(cfg.client_names()) == 100 and cfg.client_names()[7] == "part-07"


# ----- partitions -----
SIZES = Sizes(24, 6, 10)   # per source client of `domain`: a pool of 5 * 40 = 200 records


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_the_pool_once_and_are_deterministic(kind, tmp_path):
    part = Partition(kind, 8, alpha=0.5, classes=3)
    recs = client_records("domain", 0, SIZES, None, part)
    assert list(recs) == partition_client_names(8)
    pooled = client_records("domain", 0, SIZES, None)
    pool_questions = sorted(q for c in pooled.values() for r in c.values() for q in r.questions)
    got = [q for c in recs.values() for r in c.values() for q in r.questions]
    if kind == "pathological":  # answers no client draws are left out (logged)
        assert not Counter(got) - Counter(pool_questions) and len(got) > 100
    else:
        assert len(got) == 200 and sorted(got) == pool_questions
    for splits in recs.values():
        sizes = [len(splits[s]) for s in ("train", "val", "test")]
        assert min(sizes) >= 1 and tuple(sizes) == split_sizes(sum(sizes), (24 / 40, 6 / 40, 10 / 40))
        for r in splits.values():  # every question keeps its own image and answer
            assert len(r.images) == len(set(r.image_index.tolist())) and r.image_index.max() < len(r.images)
    if kind == "iid":
        assert {sum(len(r) for r in c.values()) for c in recs.values()} == {25}
    if kind == "pathological":
        assert all(len({a for r in c.values() for a in r.answers}) <= 3 for c in recs.values())
    again = client_records("domain", 0, SIZES, tmp_path, part)           # computed, then cached
    cached = client_records("domain", 0, SIZES, tmp_path, part)
    assert list(tmp_path.glob("partition-*.npz"))
    for a, b, c in zip(recs.values(), again.values(), cached.values()):
        for s in ("train", "val", "test"):
            assert a[s].questions == b[s].questions == c[s].questions
            assert np.array_equal(a[s].images, c[s].images)
    other = client_records("domain", 1, SIZES, None, part)
    assert [r["train"].questions for r in other.values()] != [r["train"].questions for r in recs.values()]


def test_dirichlet_alpha_sets_the_skew():
    def answer_entropy(alpha):
        recs = client_records("domain", 0, SIZES, None, Partition("dirichlet", 5, alpha=alpha))
        ent = []
        for c in recs.values():
            _, counts = np.unique([a for r in c.values() for a in r.answers], return_counts=True)
            p = counts / counts.sum()
            ent.append(float(-(p * np.log(p)).sum()))
        return np.mean(ent)

    assert answer_entropy(0.1) < answer_entropy(100.0)


def test_too_many_clients_for_the_pool_is_an_error():
    with pytest.raises(FedDATError, match="num-clients=500 exceeds the pool's 200 records"):
        client_records("domain", 0, SIZES, None, Partition("iid", 500))


def test_damaged_partition_cache_names_the_file(tmp_path):
    part = Partition("iid", 4)
    client_records("domain", 0, SIZES, tmp_path, part)
    (path,) = tmp_path.glob("partition-*.npz")
    path.write_bytes(b"not an npz")
    with pytest.raises(FedDATError, match=f"partition cache file {path}.*delete it"):
        client_records("domain", 0, SIZES, tmp_path, part)


def test_partitioned_clients_share_the_pooled_label_space(tiny_config):
    from feddat.federation.inprocess import build

    setup = build(tiny_config(partition="dirichlet", num_clients=6))
    assert [c.name for c in setup.clients] == partition_client_names(6)
    spaces = {tuple(c.answers) for c in setup.clients}
    assert len(spaces) == 1
    assert set(spaces.pop()) == {a for c in setup.clients for a in
                                 np.asarray(c.answers)[c.train.labels.numpy()].tolist()}


# ----- sitting out -----
def _sampled_run(tiny_config, tmp_path=None, **overrides):
    from feddat.federation.inprocess import run

    values = dict(partition="iid", num_clients=6, clients_per_round=2, rounds=3, seed=1)
    values.update(overrides)
    return run(tiny_config(**values), out_dir=tmp_path, progress=False)


def test_sampled_clients_are_recorded_and_only_they_train(tiny_config):
    res = _sampled_run(tiny_config)
    names = res["clients"]
    for r in res["rounds"]:
        expected = [names[i] for i in sample_clients(1, r["round"], 6, 2)]
        assert r["sampled_clients"] == expected
        assert sorted(r["train"]) == expected and sorted(r["bytes_sent"]) == expected
        assert sorted(r["test"]) == names  # evaluation covers every client
    assert sorted(res["final"]["clients"]) == names
    plain = _sampled_run(tiny_config, clients_per_round=0)
    assert all("sampled_clients" not in r and sorted(r["train"]) == names for r in plain["rounds"])


def test_a_client_that_sits_out_keeps_its_state_and_refreshes_its_frozen_copy(tiny_config):
    """Private state unchanged through skipped rounds; on its next round FedDAT's frozen copy starts as the
    newest aggregate, not the one of the client's previous round."""
    from feddat.federation.sampling import sample_clients
    from feddat.federation.inprocess import build, open_client_states
    from feddat.federation.server import RoundCollector, ServerRules

    cfg = tiny_config(partition="iid", num_clients=6, clients_per_round=2, rounds=4, seed=1)
    setup = build(cfg)
    worker, names = setup.worker, [c.name for c in setup.clients]
    states = open_client_states(setup)
    glob = worker.initial_global(cfg.seed)
    seen: dict[str, tuple[int, dict]] = {}
    checked = 0
    for r in range(cfg.rounds):
        sampled = sample_clients(cfg.seed, r, 6, cfg.round_size())
        before = {n: {k: v.clone() for k, v in states[n].items()} for n in names}
        collector = RoundCollector(ServerRules.of(cfg), [names[i] for i in sampled], True, glob, r)
        for i in sampled:
            name = names[i]
            res = worker.fit(setup.clients[i], states[name], glob, r, cfg.rounds, cfg.seed, i)
            # the frozen copy a client trains with (and keeps) is the aggregate it received
            assert _same_adapter(res.state, glob)
            if name in seen and seen[name][0] < r - 1:  # sat out at least the previous round
                assert _same_adapter(before[name], seen[name][1]) and not _same_adapter(before[name], glob)
                checked += 1
            states[name] = res.state
            collector.answered(name, res.metrics, res.num_examples, res.update)
            seen[name] = (r, glob)
        for n in names:
            if n not in {names[i] for i in sampled}:
                assert all(torch.equal(states[n][k], before[n][k]) for k in before[n])
        glob = collector.aggregate()
    assert checked >= 1


def _same_adapter(state, glob) -> bool:
    return all(torch.equal(state[f"adapter.global_frozen.{k}"], glob[k]) for k in glob)


# ----- private state on disk -----
def test_states_on_disk_give_exactly_the_numbers_of_states_in_memory(tiny_config, tmp_path):
    memory = _sampled_run(tiny_config)
    disk = _sampled_run(tiny_config, client_state_dir=str(tmp_path / "states"))
    assert memory["final"]["clients"] == disk["final"]["clients"]
    assert [r["train"] for r in memory["rounds"]] == [r["train"] for r in disk["rounds"]]
    files = sorted(p.name for p in (tmp_path / "states" / "inprocess").glob("*/*.safetensors"))
    trained = sorted({n for r in disk["rounds"] for n in r["sampled_clients"]})
    assert files == [f"{n}.safetensors" for n in trained]


def test_state_round_trip_gives_the_same_predictions(tiny_config, tmp_path):
    from feddat.federation.client_state import DiskStates
    from feddat.federation.inprocess import build

    setup = build(tiny_config(partition="iid", num_clients=4))
    worker, c = setup.worker, setup.clients[1]
    glob = worker.initial_global(0)
    state = worker.fit(c, worker.initial_state(1, len(c.answers), 0), glob, 0, 2, 0, 1).state
    store = DiskStates(tmp_path, [c.name], lambda n: {})
    store[c.name] = state
    back = store[c.name]
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    a = worker.evaluate(c, state, glob)["teacher"]
    b = worker.evaluate(c, back, glob)["teacher"]
    assert torch.equal(a["predictions"], b["predictions"]) and torch.equal(a["scores"], b["scores"])


def test_corrupt_state_file_names_the_client_and_the_file(tmp_path):
    from feddat.federation.client_state import DiskStates

    store = DiskStates(tmp_path, ["part-3"], lambda n: {})
    store["part-3"] = {"head.w": torch.ones(3)}
    store.path("part-3").write_bytes(b"\x10\x00\x00garbage")
    with pytest.raises(FedDATError, match=r"client part-3 in .*part-3\.safetensors is unreadable"):
        store["part-3"]
    with pytest.raises(KeyError):
        store["part-4"]


def test_many_clients_keep_state_on_disk_by_default(tiny_config):
    from feddat.federation.client_state import STATES_IN_MEMORY_UP_TO, DiskStates
    from feddat.federation.inprocess import build, open_client_states

    few = open_client_states(build(tiny_config(partition="iid", num_clients=STATES_IN_MEMORY_UP_TO)))
    assert isinstance(few, dict)
    many = open_client_states(build(tiny_config(partition="iid", num_clients=STATES_IN_MEMORY_UP_TO + 1,
                                                train_per_client=48)))
    assert isinstance(many, DiskStates)
    directory = many.directory
    assert directory.is_dir() and not list(directory.iterdir())
    many.close()
    assert not directory.exists()


def test_resume_with_sampling_gives_the_uninterrupted_run(tiny_config, tmp_path):
    import shutil

    from feddat.federation.checkpoint import load_checkpoint
    from feddat.federation.inprocess import run

    full = _sampled_run(tiny_config, tmp_path / "full", num_clients=40, train_per_client=48)  # states on disk
    part = tmp_path / "part"
    _sampled_run(tiny_config, part, num_clients=40, train_per_client=48)
    shutil.rmtree(part / "checkpoint" / "round-0003")
    ck = load_checkpoint(part)
    assert ck.round == 2
    cfg = RunConfig.from_dict(ck.config)
    resumed = run(cfg, out_dir=part, progress=False, resume=ck)
    assert resumed["final"]["clients"] == full["final"]["clients"]
    assert [r["sampled_clients"] for r in resumed["rounds"]] == [r["sampled_clients"] for r in full["rounds"]]


# ----- both engines -----
@pytest.mark.integration
def test_flower_with_sampling_and_partitions_matches_inprocess(tiny_config, tmp_path):
    from feddat.federation.flower.server_app import run_flower
    from feddat.federation.inprocess import run

    cfg = tiny_config(partition="dirichlet", num_clients=8, clients_per_round=3, rounds=2, seed=2,
                      train_per_client=40)
    ref = run(cfg, progress=False)
    got = run_flower(cfg, progress=False)
    assert got["clients"] == ref["clients"] and got["label_spaces"] == ref["label_spaces"]
    for g, r in zip(got["rounds"], ref["rounds"], strict=True):
        assert g["sampled_clients"] == r["sampled_clients"] and len(r["sampled_clients"]) == 3
        assert g["train"].keys() == r["train"].keys() == set(r["sampled_clients"])
        for client in r["train"]:
            assert all(abs(g["train"][client][k] - v) <= 1e-6 for k, v in r["train"][client].items())
        assert g["test"].keys() == r["test"].keys() and len(r["test"]) == 8
        assert all(abs(g["test"][c] - v) <= 1e-6 for c, v in r["test"].items())
    assert all(abs(got["final"]["clients"][c] - v) <= 1e-6 for c, v in ref["final"]["clients"].items())


# ----- Flower: private state off the heap -----
def _to_client(kind: str, index: int, cfg, server_round: int, global_state=None, **config):
    """A message from the server to the node of client `index`, as the ServerApp builds it."""
    import time

    from flwr.app import ConfigRecord, Message, Metadata, RecordDict

    from feddat.federation.flower.records import ARRAYS, CONFIG, RUN_CONFIG, config_to_record, state_to_record

    meta = Metadata(run_id=7, message_id=f"{kind}-{server_round}-{index}", src_node_id=0, dst_node_id=index + 1,
                    reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=3600,
                    message_type=kind)
    content = RecordDict({RUN_CONFIG: config_to_record(cfg),
                          CONFIG: ConfigRecord({"server-round": server_round, "resumed-from": 0, **config})})
    content[ARRAYS] = state_to_record(global_state)
    return Message(content=content, metadata=meta)


def _nodes(n: int):
    from flwr.app import Context, RecordDict

    return [Context(run_id=7, node_id=i + 1, node_config={"partition-id": i}, state=RecordDict(), run_config={})
            for i in range(n)]


def _train_round_one(cfg, contexts):
    """Every node answers the query, then the clients sampled for round 1 train; returns their indices."""
    from flwr.app import MessageType

    from feddat.federation.flower.client_app import client_app, get_setup

    for i, context in enumerate(contexts):
        client_app(_to_client(MessageType.QUERY, i, cfg, 0), context)
    glob = get_setup(cfg).worker.initial_global(cfg.seed)
    sampled = sample_clients(cfg.seed, 0, len(contexts), cfg.round_size())
    for i in sampled:
        reply = client_app(_to_client(MessageType.TRAIN, i, cfg, 1, glob), contexts[i])
        assert not reply.has_error() and int(reply.content["metrics"]["client-index"]) == i
    return sampled, glob


def test_flower_nodes_keep_private_state_only_in_client_state_dir(tiny_config, tmp_path):
    """With client-state-dir, a trained client's private state is in its file, not in the node's context.state;
    without it (a small federation) it is in context.state. A damaged file is an error naming client and file."""
    from flwr.app import MessageType

    from feddat.federation.client_state import node_states
    from feddat.federation.flower.client_app import client_app, get_setup
    from feddat.federation.flower.records import STATE_KEY

    values = dict(partition="iid", num_clients=6, clients_per_round=2, rounds=2, engine="flower")
    memory = tiny_config(**values)
    contexts = _nodes(6)
    sampled, _ = _train_round_one(memory, contexts)
    assert [i for i, c in enumerate(contexts) if STATE_KEY in c.state] == sampled

    cfg = tiny_config(**values, client_state_dir=str(tmp_path / "states"))
    contexts = _nodes(6)
    sampled, glob = _train_round_one(cfg, contexts)
    assert all(len(c.state) == 0 for c in contexts)
    setup, store = get_setup(cfg), node_states(cfg.to_dict(), cfg.client_state_dir, 6, 7)
    names = [c.name for c in setup.clients]
    assert [store.rounds(n) for n in names] == [[0, 1] if i in sampled else [0] for i in range(6)]
    for i in sampled:  # the file holds the trained state: different from the initial one, same keys
        trained, initial = store.load(names[i], 1), store.load(names[i], 0)
        assert trained.keys() == initial.keys() and any(not torch.equal(trained[k], initial[k]) for k in trained)
    i = sampled[0]
    store.path(names[i], 1).write_bytes(b"\x10\x00\x00garbage")
    with pytest.raises(FedDATError, match=rf"client {names[i]} in .*{names[i]}.round-0001\.safetensors is unreadable"):
        client_app(_to_client(MessageType.EVALUATE, i, cfg, 1, glob), contexts[i])


def test_flower_with_many_clients_keeps_state_in_a_temporary_directory(tiny_config, tmp_path, monkeypatch):
    """More than 32 clients and no client-state-dir: the states live only in files of a temporary directory
    named by the run, removed once every client has had its final evaluation (and by the server at the end)."""
    import tempfile

    from flwr.app import MessageType

    from feddat.federation.client_state import (STATES_IN_MEMORY_UP_TO, remove_temporary_node_dirs,
                                                temporary_node_dir)
    from feddat.federation.flower.client_app import client_app, get_setup

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    n = STATES_IN_MEMORY_UP_TO + 1
    cfg = tiny_config(partition="iid", num_clients=n, clients_per_round=2, rounds=1, engine="flower",
                      train_per_client=48)
    contexts = _nodes(n)
    sampled, glob = _train_round_one(cfg, contexts)
    assert all(len(c.state) == 0 for c in contexts)
    directory = temporary_node_dir(cfg.to_dict(), 7)
    names = [c.name for c in get_setup(cfg).clients]
    assert sorted(p.name for p in directory.iterdir()) == sorted(names[i] for i in sampled)
    for i, context in enumerate(contexts):
        reply = client_app(_to_client(MessageType.EVALUATE, i, cfg, 1, glob, final=True), context)
        assert not reply.has_error() and 0 <= reply.content["metrics"]["score"] <= 1
        if i == sampled[0]:
            assert directory.is_dir() and not (directory / names[i]).exists()
    assert not directory.exists()
    directory.mkdir()  # what a failed run leaves: the server removes it
    remove_temporary_node_dirs(7)
    assert not directory.exists()


@pytest.mark.integration
def test_flower_with_many_clients_matches_inprocess_and_leaves_no_state_files(tiny_config):
    """33 clients on Flower's simulation: states in temporary files (read back by clients drawn again in round 2)
    give the in-process engine's numbers, and nothing is left in the temporary directory."""
    import tempfile
    from pathlib import Path

    from feddat.federation.flower.server_app import run_flower
    from feddat.federation.inprocess import run

    cfg = tiny_config(partition="iid", num_clients=33, clients_per_round=20, rounds=2, seed=3, train_per_client=48,
                      eval_every=2)
    leftovers = lambda: set(Path(tempfile.gettempdir()).glob("feddat-states-run*"))
    before = leftovers()
    ref = run(cfg, progress=False)
    got = run_flower(cfg, progress=False)
    assert leftovers() <= before
    first, second = (set(r["sampled_clients"]) for r in ref["rounds"])
    assert first & second  # some clients train again from the state they saved
    for g, r in zip(got["rounds"], ref["rounds"], strict=True):
        assert g["sampled_clients"] == r["sampled_clients"]
        for client in r["train"]:
            assert all(abs(g["train"][client][k] - v) <= 1e-6 for k, v in r["train"][client].items())
    assert all(abs(got["final"]["clients"][c] - v) <= 1e-6 for c, v in ref["final"]["clients"].items())
