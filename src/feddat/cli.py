"""The `feddat` command line: run, methods, pretrain."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from feddat.errors import FedDATError


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from feddat.config import RunConfig

    defaults = RunConfig()
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = type(default) if default is not None else str
        p.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                       help=f"(default: {default})")


def _config_from_args(args) -> "RunConfig":
    from feddat.config import RunConfig

    values = {}
    if args.config:
        try:
            values.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise FedDATError(f"config file {args.config} is unreadable or not JSON: {e}") from e
        if not isinstance(values, dict):
            raise FedDATError(f"config file {args.config} must hold a JSON object")
    for f in fields(RunConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    return RunConfig.from_dict(values)


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FedDATError(f"--out {out} exists and is not a directory; choose another path")
    if out.exists() and (out / "results.json").exists() and not force:
        raise FedDATError(f"{out} already holds results.json; choose another --out or pass --force to overwrite")


def cmd_run(args) -> int:
    cfg = _config_from_args(args)
    out = Path(args.out)
    _check_out_dir(out, args.force)
    if cfg.engine == "flower":
        from feddat.federation.flower_app import run_flower as runner
    else:
        from feddat.federation.inprocess import run as runner
    results = runner(cfg, out_dir=None, progress=not args.quiet)
    from feddat.eval.results import History, client_table, plot_curves

    history = History({}, [], {})
    history.data = results
    history.save(out)
    plot_curves(results, out / "curves.png")
    print(client_table(results))
    print(f"\nwrote {out / 'results.json'} and {out / 'curves.png'}")
    return 0


def cmd_methods(args) -> int:
    from feddat.algorithms.registry import METHODS

    width = max(len(n) for n in METHODS)
    for name, m in METHODS.items():
        sends = f"sends {m.shared}" if m.shared else "sends nothing"
        print(f"{name.ljust(width)}  {m.summary} [{sends}; predicts with the {m.predict_view} view]")
    return 0


def cmd_pretrain(args) -> int:
    from feddat.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig()
    for f in fields(PretrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(cfg, f.name, v)
    info = pretrain(cfg, Path(args.out), progress=not args.quiet)
    print(json.dumps(info["eval"], indent=2))
    print(f"backbone written to {Path(args.out) / 'backbone'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="feddat", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one federated training job and score every client")
    run.add_argument("--out", required=True, help="directory for results.json and curves.png")
    run.add_argument("--config", help="JSON file of config values (command-line flags win)")
    run.add_argument("--force", action="store_true", help="overwrite results already in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_run_options(run)
    run.set_defaults(func=cmd_run)

    methods = sub.add_parser("methods", help="list the federated methods")
    methods.set_defaults(func=cmd_methods)

    pre = sub.add_parser("pretrain", help="pretrain the embedded backbone on the generated world (resumable)")
    pre.add_argument("--out", required=True, help="directory for checkpoints and the final backbone/")
    pre.add_argument("--quiet", action="store_true")
    from feddat.pretrain import PretrainConfig

    for f in fields(PretrainConfig):
        default = getattr(PretrainConfig(), f.name)
        pre.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(default), default=None,
                         help=f"(default: {default})")
    pre.set_defaults(func=cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except FedDATError as e:
        print(f"feddat: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
