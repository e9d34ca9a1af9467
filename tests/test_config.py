"""The run config: sections that check themselves, one parser of key=value and of files, a CLI that explains itself."""

import argparse
import json
from dataclasses import fields

import pytest

from feddat.algorithms.base import LocalConfig
from feddat.algorithms.personalised import DittoConfig
from feddat.algorithms.registry import METHODS, get_method, method_settings
from feddat.cli import main, parser
from feddat.config import (SECTIONS, DataConfig, FederationConfig, RunConfig, parse_pairs, read_config_file)
from feddat.errors import FedDATError


def _options(p: argparse.ArgumentParser):
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {o}", h) for o, h in _options(sub))
        elif action.option_strings and action.dest != "help":
            yield action.option_strings[-1], action.help


def test_every_option_of_every_subcommand_says_what_it_does():
    missing = [o for o, h in _options(parser()) if not h or h.startswith("(default")]
    assert not missing, missing


def test_version_is_the_installed_packages(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as stop:
        parser().parse_args(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"feddat {version('feddat')}"


def test_switches_are_flags_and_choices_are_listed():
    args = parser().parse_args(["run", "--fused", "--no-compile", "--method", "ditto-adapter"])
    assert args.fused is True and args.compile is False and args.method == "ditto-adapter"
    help_text = "".join(parser()._subparsers._group_actions[0].choices["run"].format_help().split())
    assert "oneof:samples,equal,median,trimmed-mean,krum,multi-krum,bulyan" in help_text


def test_a_bad_choice_gets_the_configs_own_message(capsys):
    assert main(["run", "--out", "/nonexistent/x", "--aggregation", "mean-ish"]) == 2
    assert "aggregation must be one of samples, equal" in capsys.readouterr().err


def test_every_key_belongs_to_one_section_and_every_method_setting_to_its_methods():
    keys = [f.name for f in fields(RunConfig)]
    assert len(keys) == len(set(keys))
    assert {f.metadata["section"] for f in fields(RunConfig)} == set(SECTIONS)
    settings = method_settings()
    assert settings["ditto_lambda"][1] == ["ditto-adapter"]
    assert set(settings["kd_temperature"][1]) >= {"feddat", "feddat-nomkd", "feddat-authors"}
    for name in METHODS:  # a method reads its settings from a run config, and only its own
        method = get_method(name, RunConfig().to_dict())
        assert {f.name for f in fields(method.config)} <= set(keys)


def test_defaults_live_in_one_place():
    cfg = RunConfig()
    assert all(getattr(cfg, f.name) == f.default for f in fields(LocalConfig))
    assert cfg.ditto_lambda == DittoConfig().ditto_lambda


@pytest.mark.parametrize("make, message", [
    (lambda: DataConfig(benchmark="nope"), "unknown benchmark"),
    (lambda: DataConfig(train_per_client=-1, val_per_client=1, test_per_client=1), "train-per-client"),
    (lambda: FederationConfig(rounds=0), "rounds must be a positive integer"),
    (lambda: FederationConfig(clients_per_round=1.5), "clients-per-round as a fraction"),
    (lambda: LocalConfig(batch_size=0), "batch-size"),
    (lambda: DittoConfig(ditto_lambda=-1.0), "ditto-lambda"),
])
def test_each_section_checks_its_own_values(make, message):
    with pytest.raises(FedDATError, match=message):
        make()


def test_the_running_method_gets_its_own_settings():
    cfg = RunConfig(method="ditto-adapter", ditto_lambda=0.7).validate()
    assert cfg.method_config == DittoConfig(ditto_lambda=0.7)
    assert cfg.section("federation").rounds == cfg.rounds
    with pytest.raises(FedDATError, match="ditto-lambda"):
        RunConfig(method="feddat", ditto_lambda=-0.5).validate()  # every method's settings are checked


def test_print_config_is_toml_that_config_reads_back(tmp_path, capsys):
    flags = ["--method", "ditto-adapter", "--ditto-lambda", "0.3", "--lr-adapter", "0.02", "--fused",
             "--clients-per-round", "0.5", "--model-path", str(tmp_path)]
    assert main(["run", "--print-config", *flags]) == 0
    text = capsys.readouterr().out
    assert "[method]" in text and "[federation]" in text and "ditto_lambda = 0.3" in text
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert main(["run", "--print-config", "--config", str(path)]) == 0
    assert capsys.readouterr().out == text
    again = RunConfig.from_dict(read_config_file(path))
    assert again.ditto_lambda == 0.3 and again.fused is True and again.clients_per_round == 0.5
    assert again.cache_dir is None  # an unset path is written as "" and read back as unset


def test_flat_json_and_sectioned_toml_and_flower_pairs_give_one_config(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"lr-adapter": 0.02, "rounds": 3, "secure_aggregation": False}))
    (tmp_path / "b.toml").write_text("[train]\nlr_adapter = 0.02\n[federation]\nrounds = 3\n")
    pairs = parse_pairs('lr-adapter=0.02 rounds=3 model-path="" method=feddat')
    a = RunConfig.from_values(read_config_file(tmp_path / "a.json"))
    b = RunConfig.from_values(read_config_file(tmp_path / "b.toml"))
    c = RunConfig.from_values(pairs)
    assert a == b == c and a.lr_adapter == 0.02 and a.rounds == 3
    assert parse_pairs(["clients-per-round=3", "clients_per_round=0.25"]) == {"clients_per_round": 0.25}
    assert parse_pairs("client-id=2 name='a b'", config_keys=False) == {"client-id": 2, "name": "a b"}


@pytest.mark.parametrize("text, message", [
    ("rounds", "'rounds' is not key=value"),
    ("rounds=three", "rounds='three': expected int"),
    ("no-such-key=1", "unknown config key 'no-such-key'"),
])
def test_bad_pairs_name_the_item(text, message):
    with pytest.raises(FedDATError, match=message):
        parse_pairs(text)


def test_bad_config_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    with pytest.raises(FedDATError, match="bad.toml is not TOML"):
        read_config_file(bad)
    with pytest.raises(FedDATError, match="unreadable"):
        read_config_file(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(FedDATError, match="must hold"):
        read_config_file(tmp_path / "list.json")
