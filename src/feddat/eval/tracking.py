"""Experiment tracking: TensorBoard, MLflow or Weights & Biases, fed by `History` as a run records itself.

`feddat run --tracker NAME` (RunConfig.tracker) attaches a tracker to the run's History, so both engines log
the same numbers under the same names, the names of results.json joined with "/":

- params / hparams: the resolved run config (`config` of results.json; unset values as "None");
- every round, at step = round + 1 (the server round, as in curves.png): `test/<client>` and `avg_score`
  (evaluation rounds), `train/<client>/<loss>`, `bytes_sent/<client>`, `seconds`;
- at the end, at step = rounds: `final/clients/<client>`, `final/avg_score`, `final/avg_score_se`,
  `final/views/<view>/clients/<client>`, `final/views/<view>/avg_score`, `final/breakdown/<client>/<key>`
  and `wall_seconds`.

Where the logs go: TensorBoard event files under `<out>/tensorboard`; MLflow to $MLFLOW_TRACKING_URI if set,
else a local file store `<out>/mlruns` (experiment $MLFLOW_EXPERIMENT_NAME or "feddat"); W&B to the project
$WANDB_PROJECT or "feddat", files under `<out>` (set WANDB_MODE=offline to log without an account). None of
the packages is needed by the default install: `pip install 'feddat[track]'`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from feddat.config import TRACKERS
from feddat.errors import FedDATError

INSTALL_HINT = "pip install 'feddat[track]'"


def _missing(tracker: str, package: str, error: Exception) -> FedDATError:
    return FedDATError(f"--tracker {tracker} needs the {package} package, which is not installed ({error}); "
                       f"install the tracking extras: {INSTALL_HINT}")


# ----- what is logged -----
def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, keys joined with "/"."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_params(config: dict[str, Any]) -> dict[str, Any]:
    """The run config as tracker params: scalars kept, None and anything else as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(config).items()}


def round_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """One results.json round entry as metrics."""
    m: dict[str, float] = {}
    for client, score in entry.get("test", {}).items():
        m[f"test/{client}"] = float(score)
    if "avg_score" in entry:
        m["avg_score"] = float(entry["avg_score"])
    for client, losses in entry.get("train", {}).items():
        for name, v in losses.items():
            m[f"train/{client}/{name}"] = float(v)
    for client, n in entry.get("bytes_sent", {}).items():
        m[f"bytes_sent/{client}"] = float(n)
    m["seconds"] = float(entry["seconds"])
    return m


def final_metrics(data: dict[str, Any]) -> dict[str, float]:
    """results.json's final report (and wall_seconds) as metrics."""
    m = {f"final/{k}": float(v) for k, v in flatten(data["final"]).items()
         if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if data.get("wall_seconds") is not None:
        m["wall_seconds"] = float(data["wall_seconds"])
    return m


def step_of(entry: dict[str, Any]) -> int:
    return int(entry["round"]) + 1


# ----- the tracker a History talks to -----
class Tracker:
    """A History listener that logs to one backend; subclasses implement log_params, log_metrics, _close."""

    name = ""

    def __init__(self):
        self.rounds = 0
        self.closed = False

    def on_start(self, data: dict[str, Any]) -> None:
        self.rounds = int(data["config"].get("rounds", 0))
        self.log_params(config_params(data["config"]))

    def on_round(self, entry: dict[str, Any]) -> None:
        self.log_metrics(round_metrics(entry), step_of(entry))

    def on_finish(self, data: dict[str, Any]) -> None:
        last = data["rounds"][-1]["round"] + 1 if data["rounds"] else self.rounds
        self.log_metrics(final_metrics(data), last)

    def close(self, ok: bool = True) -> None:
        if not self.closed:
            self.closed = True
            self._close(ok)

    # backends
    def log_params(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _close(self, ok: bool) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, log_dir: Path):
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing(self.name, "tensorboard", e) from e
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_params(self, params: dict[str, Any]) -> None:
        """The config as TensorBoard hparams of this run (its HPARAMS tab), linked to the final metrics."""
        from torch.utils.tensorboard.summary import hparams

        exp, start, end = hparams(params, {"final/avg_score": 0.0, "avg_score": 0.0})
        writer = self.writer._get_file_writer()
        for summary in (exp, start, end):
            writer.add_summary(summary)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def _close(self, ok: bool) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, out_dir: Path | None, run_name: str):
        super().__init__()
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise _missing(self.name, "mlflow", e) from e
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri and out_dir is not None:
            uri = (Path(out_dir).resolve() / "mlruns").as_uri()
        if uri and uri.startswith("file:"):
            # MLflow 3 keeps its file store but asks for this opt-in; a tracking server or database needs none.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        try:
            self.client = MlflowClient(uri)
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "feddat")
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        except Exception as e:
            raise FedDATError(f"MLflow could not start a run at {uri or 'its default tracking URI'}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def _close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, out_dir: Path | None, run_name: str):
        super().__init__()
        try:
            import wandb
        except ImportError as e:
            raise _missing(self.name, "wandb", e) from e
        kwargs: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT", "feddat"), "name": run_name}
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(out_dir)
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:
            raise FedDATError(f"W&B could not start a run ({str(e).strip().splitlines()[0] if str(e).strip() else e!r}); "
                              "log in with `wandb login` or set WANDB_MODE=offline") from e

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def _close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def open_tracker(name: str | None, out_dir: Path | None, config: dict[str, Any]) -> Tracker | None:
    """The tracker `name` (None: no tracking) for a run writing to `out_dir`."""
    if name is None:
        return None
    if name not in TRACKERS:
        raise FedDATError(f"unknown tracker {name!r}; choose one of {', '.join(TRACKERS)}")
    run_name = Path(out_dir).name if out_dir is not None else \
        f"{config.get('method')}-{config.get('benchmark')}-seed{config.get('seed')}"
    if name == "tensorboard":
        log_dir = Path(out_dir) / "tensorboard" if out_dir is not None else Path("runs") / "tensorboard" / run_name
        return TensorBoardTracker(log_dir)
    if name == "mlflow":
        return MLflowTracker(out_dir, run_name)
    return WandbTracker(out_dir, run_name)
