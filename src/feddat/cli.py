"""The `feddat` command line: run, compare, tune, deploy, predict, eval, data, methods, pretrain."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

from feddat.errors import FedDATError


SECTION_TITLES = {
    "data": "data: what the clients' data are",
    "model": "model: the frozen backbone and the adapters' size",
    "train": "train: how a client trains locally (every method)",
    "method": "method: which method, and each method's own settings (the methods that read one are named)",
    "federation": "federation: the server's rounds",
    "privacy": "privacy and robustness: robust aggregation, update screening, central DP, SecAgg+, faults",
    "eval": "eval: when and how clients are scored, experiment tracking",
    "runtime": "runtime: seed, engine, device, threads, where private states live",
}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """One option per RunConfig key, grouped by section, help and choices from the fields' metadata. Defaults
    stay None here so that a flag that was not given does not override --config."""
    from feddat.config import RunConfig

    groups = {}
    for f in fields(RunConfig):
        section = f.metadata["section"]
        if section not in groups:
            groups[section] = p.add_argument_group(SECTION_TITLES[section])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if "methods" in f.metadata:
            help_text = f"[{', '.join(f.metadata['methods'])}] " + help_text.split(": ", 1)[-1]
        shown = "unset" if f.default is None else f.default
        help_text = f"{help_text} (default: {shown})".replace("%", "%%")
        options = dict(dest=f.name, default=None, help=help_text)
        if f.name == "client_data":  # one client per flag: --client NAME=PATH, repeatable
            groups[section].add_argument("--client", action="append", metavar="NAME=PATH", **options)
            continue
        if isinstance(f.default, bool):
            groups[section].add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        kind = _count_or_fraction if f.name == "clients_per_round" else \
            type(f.default) if f.default is not None else str
        choices = f.metadata.get("choices")
        if choices:  # listed here; the config refuses others with its own message (exit code 2)
            options["help"] = f"{help_text[:-1]}; one of: {', '.join(choices)})"
        groups[section].add_argument(flag, type=kind, metavar=f.name.upper(), **options)


def _count_or_fraction(text: str) -> int | float:
    """An integer count ('10') or a fraction ('0.1')."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a count or a fraction in (0, 1], got {text!r}") from None


def _config_from_args(args):
    from feddat.config import RunConfig

    return RunConfig.from_dict(_given_values(args))


def _given_values(args) -> dict:
    """The config values the user gave: the --config file (JSON or TOML), then the flags over it."""
    from feddat.config import RunConfig, read_config_file

    values = read_config_file(args.config) if args.config else {}
    for f in fields(RunConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = ",".join(v) if isinstance(v, list) else v
    return values


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FedDATError(f"--out {out} exists and is not a directory; choose another path")
    if out.exists() and (out / "results.json").exists() and not force:
        raise FedDATError(f"{out} already holds results.json; choose another --out or pass --force to overwrite")


def cmd_run(args) -> int:
    if args.print_config:
        print(_config_from_args(args).to_toml(), end="")
        return 0
    if args.resume:
        return _resume(args)
    if not args.out:
        raise FedDATError("feddat run needs --out DIR (or --resume DIR to go on with an interrupted run)")
    cfg = _config_from_args(args)
    out = Path(args.out)
    _check_out_dir(out, args.force)
    if cfg.engine == "flower":
        from feddat.federation.flower.server_app import run_flower as runner
    else:
        from feddat.federation.inprocess import run as runner
    results = runner(cfg, out_dir=out, progress=not args.quiet)  # writes results.json and clients/
    _report(results, out)
    return 0


def _resume(args) -> int:
    """Go on with the run in --resume DIR after its last complete checkpoint, with the config saved there."""
    from feddat.federation.checkpoint import load_checkpoint, resume_config

    ck = load_checkpoint(Path(args.resume))
    for problem in ck.skipped:
        print(f"feddat: warning: {problem}; using the previous checkpoint {ck.path}", file=sys.stderr)
    cfg = resume_config(ck.config, _given_values(args))
    out = Path(args.out) if args.out else Path(args.resume)
    _check_out_dir(out, args.force)
    if cfg.engine == "flower":
        from feddat.federation.flower.server_app import run_flower as runner
    else:
        from feddat.federation.inprocess import run as runner
    results = runner(cfg, out_dir=out, progress=not args.quiet, resume=ck)
    _report(results, out)
    return 0


def _report(results: dict, out: Path) -> None:
    from feddat.eval.results import client_table, plot_curves

    plot_curves(results, out / "curves.png")
    print(client_table(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'curves.png'} and the client models in {out / 'clients'}")


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise FedDATError(f"{path} is unreadable: {e}") from e
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FedDATError(f"{path} line {n} is not JSON: {e}") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or \
                not isinstance(rec.get("question"), str):
            raise FedDATError(f"{path} line {n} needs string fields \"image\" (a path) and \"question\"")
        records.append(rec)
    return records


class _NoLoadBars:
    """No transformers progress bar while a saved model's backbone loads (the output is the predictions)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self.was:
            hf_logging.enable_progress_bar()


def cmd_predict(args) -> int:
    with _NoLoadBars():
        return _predict(args)


def _predict(args) -> int:
    from feddat.inference import load_client, read_image

    if (args.input is None) == (args.image is None):
        raise FedDATError("give either --image and --question, or --input FILE.jsonl (with --output FILE.jsonl)")
    if args.image is not None and args.question is None:
        raise FedDATError("--image needs --question")
    if args.input is not None and args.output is None:
        raise FedDATError("--input needs --output FILE.jsonl")
    if args.top_k < 1:
        raise FedDATError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.batch_size < 1:
        raise FedDATError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.image is not None:
        image = read_image(args.image)
        image2 = [read_image(args.image2)] if args.image2 else None
        candidates = [[c.strip() for c in args.candidates.split("|")]] if args.candidates else None
        model = load_client(args.run, args.client, args.model_path, args.device, args.backbone)
        (answers,) = model.predict([image], [args.question], view=args.view, top_k=args.top_k, images2=image2,
                                   candidates=candidates)
        width = max(len(a) for a, _ in answers)
        for answer, p in answers:
            print(f"{answer.ljust(width)}  {p:.4f}")
        return 0

    from tqdm import tqdm

    input_path = Path(args.input)
    records = _read_jsonl(input_path)
    base = input_path.parent
    # an image path is relative to the input file (or, if not found there, to the working directory)
    resolve = lambda p: base / p if not Path(p).is_absolute() and (base / p).exists() else Path(p)
    model = load_client(args.run, args.client, args.model_path, args.device, args.backbone)
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        with open(tmp, "w") as f, tqdm(total=len(records), desc=f"predict {args.client}", unit="question",
                                        disable=args.quiet) as bar:
            for start in range(0, len(records), args.batch_size):
                chunk = records[start:start + args.batch_size]
                images = [read_image(resolve(r["image"])) for r in chunk]
                images2 = [read_image(resolve(r["image2"])) for r in chunk] if "image2" in chunk[0] else None
                candidates = [r["candidates"] for r in chunk] if "candidates" in chunk[0] else None
                preds = model.predict(images, [r["question"] for r in chunk], view=args.view, top_k=args.top_k,
                                      images2=images2, candidates=candidates)
                for rec, answers in zip(chunk, preds):
                    rec = dict(rec, answers=[a for a, _ in answers], probabilities=[p for _, p in answers])
                    f.write(json.dumps(rec) + "\n")
                bar.update(len(chunk))
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {len(records)} predictions to {out_path}")
    return 0


def cmd_eval(args) -> int:
    from feddat.eval.results import client_table
    from feddat.inference import evaluate_run

    clients = [args.client] if args.client else None
    if args.data is not None:
        data = _eval_file(args)
    else:
        if args.view is not None:
            raise FedDATError("--view applies to --data; a run's own test splits are scored in every view it reports")
        other = args.benchmark is not None or args.data_dir is not None
        with _NoLoadBars():
            data = evaluate_run(args.run, clients, args.model_path, args.cache_dir, args.device,
                                progress=not args.quiet, family=args.backbone, data_dir=args.data_dir,
                                benchmark=args.benchmark, skip_bad=args.skip_bad_records)
        run_results = json.loads((Path(args.run) / "results.json").read_text())
        print(client_table({**data, "rounds": [] if other else run_results.get("rounds", [])[-1:]}))
    out = Path(args.out) if args.out else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise FedDATError(f"--out {out} exists and is not a directory; choose another path")
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "eval.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(out / "eval.json")
        print(f"\nwrote {out / 'eval.json'}")
    return 0


def _eval_file(args) -> dict:
    """Score one client's saved model on a labelled JSON-lines file (image, question, answer)."""
    from feddat.inference import evaluate_file

    if args.client is None:
        raise FedDATError("--data needs --client: the file is scored with one client's model")
    path = Path(args.data)
    records = _read_jsonl(path)
    if not records:
        raise FedDATError(f"{path} holds no records to score")
    for n, rec in enumerate(records, 1):
        if not isinstance(rec.get("answer"), str):
            raise FedDATError(f"{path} record {n} needs a string field \"answer\" to be scored")
    with _NoLoadBars():
        data = evaluate_file(args.run, args.client, records, path.parent, args.model_path, args.view, args.device,
                             progress=not args.quiet, family=args.backbone)
    data["data"] = str(path)
    print(f"client {args.client} ({data['view']} view) on {path}: accuracy {data['final']['avg_score']:.4f} "
          f"± {data['final']['avg_score_se']:.4f} over {data['n']} questions"
          + (f"; {data['unknown_answers']} answers outside its label space" if data["unknown_answers"] else ""))
    return data


def cmd_methods(args) -> int:
    from feddat.algorithms.registry import METHODS

    width = max(len(n) for n in METHODS)
    for name, m in METHODS.items():
        sends = "pools raw data, not federated" if m.pooled else f"sends {m.shared}" if m.shared else "sends nothing"
        print(f"{name.ljust(width)}  {m.summary} [{sends}; predicts with the {m.predict_view} view]")
    return 0


def _comparison_base(args, command: str):
    """The config every run of a comparison or search shares: --config, then the run flags (not --method or
    --seed, which the command sets per run)."""
    from feddat.config import RunConfig

    for name, instead in (("method", "--methods"), ("seed", "--seeds")):
        if getattr(args, name) is not None:
            raise FedDATError(f"feddat {command} sets --{name} per run; give {instead} instead")
    values = _given_values(args)
    if values.get("engine", "inprocess") != "inprocess":
        raise FedDATError(f"feddat {command} runs on the in-process engine; leave out --engine")
    values.pop("method", None)
    values.pop("seed", None)
    return RunConfig.from_dict(values)


def cmd_compare(args) -> int:
    from feddat.experiments.sweep import parse_seeds, resolve_methods, run_comparison

    base = _comparison_base(args, "compare")
    methods, seeds, out = resolve_methods(args.methods), parse_seeds(args.seeds), Path(args.out)
    data = base.clients_dir or ("your client folders" if base.client_data else base.benchmark)
    print(f"comparing {len(methods)} methods over seeds {args.seeds} on {data} in {out}")
    run_comparison(base, methods, seeds, out, progress=not args.quiet, jobs=args.jobs)
    print("\n" + (out / "table.md").read_text())
    print(f"wrote {out / 'table.md'}, {out / 'table.json'} and {out / 'compare.png'}")
    return 0


def cmd_tune(args) -> int:
    from feddat.experiments.sweep import parse_seeds, resolve_methods
    from feddat.experiments.tune import parse_grid, run_tune

    if (args.methods is None) == (args.method is None):
        raise FedDATError("feddat tune needs --method M or --methods m1,m2,... (one of them)")
    methods = resolve_methods(args.methods or args.method)
    args.method = None
    base = _comparison_base(args, "tune")
    grid = parse_grid(args.grid)
    search = run_tune(base, methods, grid, parse_seeds(args.seeds), Path(args.out),
                      progress=not args.quiet, jobs=args.jobs)
    for m, info in search["methods"].items():
        best = ", ".join(f"{k}={v}" for k, v in info["best"].items()) if info["best"] else "none could run"
        print(f"{m}: best {best}")
    print(f"wrote {Path(args.out) / 'tune.md'} and {Path(args.out) / 'tune.json'}")
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


def cmd_data(args) -> int:
    from feddat.data.benchmarks import resolve_sizes
    from feddat.data.report import stats_table, write_report
    from feddat.federation.inprocess import default_cache_dir

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.clients_dir or args.client:
        return _describe_folders(args, cache)
    sizes = resolve_sizes(args.benchmark, args.train_per_client, args.val_per_client, args.test_per_client)
    if args.export:
        return _export(args, sizes, cache)
    if not args.out:
        raise FedDATError("feddat data needs --out DIR (or --export DIR)")
    records, written = None, []
    if args.data_dir:  # the paper's benchmark over the real datasets in --data-dir (docs/datasets.md)
        from feddat.data.real import load_real_splits, write_records

        with _log_to_stderr():
            splits = load_real_splits(args.benchmark, Path(args.data_dir), args.seed, sizes, args.image_size,
                                      skip_bad=args.skip_bad_records)
        records = {c: {s: v.records for s, v in per.items()} for c, per in splits.items()}
        written = write_records(splits, Path(args.out))
    stats = write_report(args.benchmark, Path(args.out), args.seed, sizes, cache, records=records)
    print(f"benchmark {args.benchmark}, seed {args.seed}" + (f", data {args.data_dir}" if args.data_dir else "") + "\n")
    print(stats_table(stats))
    print(f"\nwrote {Path(args.out) / 'stats.json'} and samples_<client>.png for {len(stats['clients'])} clients"
          + (f", and {len(written)} files under {Path(args.out) / 'records'}" if written else ""))
    return 0


def _describe_folders(args, cache: Path) -> int:
    """`feddat data --clients-dir DIR` (or --client NAME=PATH ...): your client folders' sample sheets and
    statistics, as for a benchmark, read as a run reads them (the same checks, the same split by seed)."""
    from feddat.data.folders import check_unique_names, client_dirs, load_named_folders, parse_columns
    from feddat.data.report import stats_table, write_folder_report
    from feddat.models.backbone import load_backbone

    if not args.out:
        raise FedDATError("feddat data --clients-dir/--client needs --out DIR")
    if args.export or args.data_dir:
        raise FedDATError("describing your own folders cannot go with --export or --data-dir")
    if args.clients_dir and args.client:
        raise FedDATError("give the client folders as one folder of folders (--clients-dir) or one by one "
                          "(--client), not both")
    folders = client_dirs(args.clients_dir) if args.clients_dir else check_unique_names(args.client)
    if not folders:
        raise FedDATError(f"{args.clients_dir} holds no client folder")
    _, tokenizer = load_backbone(None)
    with _log_to_stderr():
        clients = load_named_folders(folders, tokenizer, 8, 48, args.seed, parse_columns(args.columns),
                                     args.skip_bad_records, cache_dir=cache / "datasets")
        stats = write_folder_report(clients, Path(args.out), args.clients_dir or ", ".join(args.client))
    print(f"{len(clients)} client folders: {', '.join(name for name, _ in folders)}, seed {args.seed}\n")
    print(stats_table(stats))
    print(f"\nwrote {Path(args.out) / 'stats.json'} and samples_<client>.png for {len(clients)} clients")
    return 0


def _export(args, sizes, cache: Path) -> int:
    """`feddat data --export DIR`: the benchmark (generated, or the paper's datasets in --data-dir) as one client
    folder per client, in the format `feddat run --clients-dir` reads (feddat.data.folders)."""
    from feddat.data.benchmarks import RealData
    from feddat.data.clients import export_benchmark

    real = RealData(args.data_dir, args.image_size, args.skip_bad_records) if args.data_dir else None
    with _log_to_stderr():
        folders = export_benchmark(args.benchmark, args.seed, sizes, Path(args.export), cache, real=real,
                                   overwrite=args.force, progress=True)
    print(f"wrote {len(folders)} client folders under {args.export}: {', '.join(p.name for p in folders)}\n"
          f"train on them with: feddat run --clients-dir {args.export} --out runs/own")
    return 0


@contextlib.contextmanager
def _log_to_stderr():
    """feddat's info messages (records kept, dropped, skipped) on stderr while the block runs."""
    import logging

    logger = logging.getLogger("feddat")
    handler, level = logging.StreamHandler(), logger.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _add_deploy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="directory for certificates, keys, node state, logs and the "
                   "run's out/ (results.json, clients/, checkpoint/)")
    p.add_argument("--clients", type=int, default=3, help="SuperNodes to start, one per client: the benchmark's "
                   "first N clients (default: 3)")
    p.add_argument("--client-data", nargs="+", metavar="PATH", default=[], help="client folders, one SuperNode "
                   "each: every node opens only its own folder and keeps its model under WORKDIR/nodes/<i>/out; the "
                   "server holds no data (docs/own-data.md)")
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


def cmd_deploy(args) -> int:
    """`feddat deploy`: start, run once, print the results' table, stop everything."""
    from feddat.eval.results import client_table
    from feddat.federation.deploy.deployment import Deployment, check_run_config, parse_run_config

    if args.clients < 1:
        raise FedDATError(f"--clients must be a positive integer, got {args.clients}")
    clients = len(args.client_data) if args.client_data else args.clients
    if args.timeout <= 0:
        raise FedDATError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    run_config = parse_run_config(args.run_config)
    for key in ("clients", "nodes", "out-dir"):
        if key in run_config:
            raise FedDATError(f"--run-config may not set {key}: feddat deploy sets it (use --clients, --client-data "
                              "or --workdir)")
    deployment = Deployment(Path(args.workdir), clients, tls=not args.insecure,
                            auth=not (args.insecure or args.no_auth), node_config=parse_run_config(args.node_config),
                            app_dir=Path(args.app) if args.app else None,
                            client_data=[Path(p) for p in args.client_data])
    size = {"nodes": clients} if args.client_data else {"clients": clients}
    check_run_config(deployment.app_dir, {**size, **run_config})
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
    if args.client_data:
        print(f"each node kept its model and its own results.json on its disk: "
              f"{deployment.workdir / 'nodes' / '<i>' / 'out'} (feddat eval --run / feddat predict --run there)")
    return 0


def parser() -> argparse.ArgumentParser:
    from feddat import __version__
    from feddat.data.benchmarks import BENCHMARKS, sizes_help
    from feddat.models.backbone import BACKBONES

    p = argparse.ArgumentParser(prog="feddat", description=__doc__)
    p.add_argument("--version", action="version", version=f"feddat {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one federated training job and score every client")
    run.add_argument("--out", help="directory for results.json, curves.png, clients/ and checkpoint/ "
                                    "(required unless --resume)")
    run.add_argument("--resume", metavar="DIR", help="go on with the interrupted run in DIR from its last complete "
                     "round (its checkpoint/); uses the config saved there (flags may only change threads, "
                     "device, cache-dir, tracker, client-state-dir); writes to DIR unless --out is given")
    run.add_argument("--config", help="a JSON or TOML file of config values, flat or by section as --print-config "
                     "writes it (command-line flags win)")
    run.add_argument("--print-config", action="store_true", help="print the resolved config as TOML (which "
                     "--config reads back) and stop")
    run.add_argument("--force", action="store_true", help="overwrite results already in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_run_options(run)
    run.set_defaults(func=cmd_run)

    pred = sub.add_parser("predict", help="answer questions about images with a saved client model")
    pred.add_argument("--run", required=True, help="the --out directory of a `feddat run`")
    pred.add_argument("--client", required=True, help="which client's model (e.g. clipart)")
    pred.add_argument("--image", help="an image file (the backbone's image size, e.g. 48x48 for the embedded one)")
    pred.add_argument("--question", help="the question about --image")
    pred.add_argument("--image2", help="image-pair clients: the second image of the statement")
    pred.add_argument("--candidates", help="multiple-choice clients: the candidate answers, separated by |")
    pred.add_argument("--input", help="JSON lines with \"image\" (path, relative to the file) and \"question\" (and "
                      "\"image2\" for image pairs, \"candidates\" for multiple choice)")
    pred.add_argument("--output", help="JSON lines written for --input: each record plus answers and probabilities")
    pred.add_argument("--top-k", dest="top_k", type=int, default=5, help="answers to show (default: 5)")
    pred.add_argument("--view", help="student, local, teacher, frozen or mixed, among the views the method "
                      "reports (default: the method's predicting view)")
    pred.add_argument("--model-path", dest="model_path", help="the backbone (default: the one client.json names)")
    pred.add_argument("--backbone", choices=BACKBONES, help="the backbone family, vilt or blip (default: the one "
                      "client.json records)")
    pred.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    pred.add_argument("--batch-size", dest="batch_size", type=int, default=64,
                      help="questions per forward pass with --input (default: 64)")
    pred.add_argument("--quiet", action="store_true", help="no progress bar")
    pred.set_defaults(func=cmd_predict)

    ev = sub.add_parser("eval", help="re-score a run's saved client models on their test splits, or one client "
                        "on a labelled JSON-lines file")
    ev.add_argument("--run", required=True, help="the --out directory of a `feddat run`")
    ev.add_argument("--client", help="only this client (default: every client)")
    ev.add_argument("--out", help="directory to write eval.json (final.clients, avg_score, ...)")
    ev.add_argument("--model-path", dest="model_path", help="the backbone (default: the one client.json names)")
    ev.add_argument("--backbone", choices=BACKBONES, help="the backbone family, vilt or blip (default: the one "
                    "client.json records)")
    ev.add_argument("--cache-dir", dest="cache_dir", help="benchmark cache (default: the run's)")
    ev.add_argument("--data", help="score --client on this JSON-lines file instead (image path relative to the "
                    "file, question, answer)")
    ev.add_argument("--view", help="with --data: the view to score (default: the method's predicting view)")
    ev.add_argument("--data-dir", dest="data_dir", help="score on the test split of the real datasets in this "
                    "directory (docs/datasets.md): the run's benchmark, or --benchmark")
    ev.add_argument("--benchmark", help="score on this benchmark's test split (generated, or read from --data-dir); "
                    "each saved client on the client of the same name")
    ev.add_argument("--skip-bad-records", dest="skip_bad_records", action="store_true",
                    help="with --data-dir: skip (and count) malformed records and unreadable images")
    ev.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    dep = sub.add_parser("deploy", help="run on a Flower deployment on this machine: a SuperLink and one SuperNode "
                         "per client, each a process (TLS, SuperNode authentication); stops them at the end")
    _add_deploy_options(dep)
    dep.set_defaults(func=cmd_deploy)

    data = sub.add_parser("data", help="a benchmark's sample sheets (PNG per client), statistics and how far apart "
                          "its clients are (stats.json and a table)")
    data.add_argument("--benchmark", default="domain",
                      help=f"the benchmark to describe or export; one of: {', '.join(BENCHMARKS)} (default: domain)")
    data.add_argument("--out", help="directory for samples_<client>.png and stats.json (required unless --export)")
    data.add_argument("--export", metavar="DIR", help="write the benchmark as one client folder per client (images "
                      "and metadata.jsonl, the format --clients-dir reads) under DIR instead")
    data.add_argument("--force", action="store_true", help="with --export: replace client folders already there")
    data.add_argument("--seed", type=int, default=0, help="the seed its data are generated from (default: 0)")
    for split in ("train", "val", "test"):
        data.add_argument(f"--{split}-per-client", dest=f"{split}_per_client", type=int, default=0,
                          help=f"{split} records per client (default: 0 = the benchmark's: {sizes_help()})")
    data.add_argument("--cache-dir", dest="cache_dir", help="benchmark cache (default: ~/.cache/feddat)")
    data.add_argument("--data-dir", dest="data_dir", help="read the benchmark's real datasets from this directory "
                      "(layout: docs/datasets.md) instead of generating it; also writes records/<client>/<split>.jsonl")
    data.add_argument("--skip-bad-records", dest="skip_bad_records", action="store_true",
                      help="with --data-dir: skip (and count) malformed records and unreadable images instead of "
                      "stopping at the first")
    data.add_argument("--image-size", dest="image_size", type=int, default=48,
                      help="with --data-dir: the side images are resized to (default: 48)")
    data.add_argument("--clients-dir", dest="clients_dir", help="describe your own client folders instead: every "
                      "sub-folder of this folder is a client (docs/own-data.md)")
    data.add_argument("--client", action="append", metavar="NAME=PATH", default=[], help="describe this client "
                      "folder (repeatable) instead of a benchmark")
    data.add_argument("--columns", default="", help="with your own folders: how their columns map to ours, e.g. "
                      "image=img,question=q,answer=label")
    data.set_defaults(func=cmd_data)

    cmp = sub.add_parser("compare", help="run several methods over several seeds and tabulate them (mean ± std "
                         "over seeds, parameters, bytes); resumes where it stopped")
    cmp.add_argument("--methods", default="all",
                     help="'all' (every registered method but the one-way distillation probes) or m1,m2,... "
                          "(default: all)")
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    cmp.add_argument("--out", required=True, help="directory for <method>/seed<k>/ runs, table.md, table.json "
                     "and compare.png")
    cmp.add_argument("--config", help="a JSON or TOML file of config values shared by every run (flags win)")
    cmp.add_argument("--quiet", action="store_true", help="no progress bars (the per-run lines stay)")
    cmp.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process with cores/jobs "
                     "threads (default: 1)")
    _add_run_options(cmp)
    cmp.set_defaults(func=cmd_compare)

    tune = sub.add_parser("tune", help="grid search on the validation split: the best setting per method")
    tune.add_argument("--methods", help="'all' or m1,m2,...: each gets the same grid (--method M: one method)")
    tune.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                      help="a config key and its values (repeatable: the grid is their product)")
    tune.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    tune.add_argument("--out", required=True, help="directory for <setting>/<method>/seed<k>/, tune.md and tune.json")
    tune.add_argument("--config", help="a JSON or TOML file of config values shared by every run (flags win)")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.add_argument("--jobs", type=int, default=1, help="runs of a grid point at once (its methods x seeds), "
                      "each in its own process with cores/jobs threads (default: 1)")
    _add_run_options(tune)
    tune.set_defaults(func=cmd_tune)

    methods = sub.add_parser("methods", help="list the federated methods")
    methods.set_defaults(func=cmd_methods)

    pre = sub.add_parser("pretrain", help="pretrain the embedded backbone on the generated world (resumable)")
    pre.add_argument("--out", required=True, help="directory for checkpoints and the final backbone/")
    pre.add_argument("--quiet", action="store_true", help="no progress bars")
    from feddat.pretrain import PretrainConfig

    for f in fields(PretrainConfig):
        default = getattr(PretrainConfig(), f.name)
        pre.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(default), default=None,
                         help=f"{f.metadata['help']} (default: {default})")
    pre.set_defaults(func=cmd_pretrain)
    return p


def quiet_libraries() -> None:
    """--quiet: no progress bars from transformers / huggingface_hub either (e.g. "Loading weights"), in this
    process and in the processes it starts (they inherit the environment)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        return args.func(args)
    except FedDATError as e:
        print(f"feddat: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
