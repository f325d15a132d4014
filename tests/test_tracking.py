"""The logger group: each tracker's files read back with its own reader, a resume that continues the
same tracker runs with every step once, a branch that starts new ones, and trackers that fail."""

import csv
import json
import shutil
import struct

import pytest
from omegaconf import OmegaConf

from conftest import TINY_TRAIN, metric_steps, run_in_process
from diffusion_cli import tracking
from diffusion_cli.errors import UserError

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

ALL = "logger=[csv,tensorboard,wandb,mlflow]"


@pytest.fixture
def offline(tmp_path):
    """W&B offline, its caches and settings in tmp_path (not the user's home)."""
    return {"WANDB_MODE": "offline", "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}


def train(run_dir, *args, env):
    """A tiny run with every tracker; with resume= in args, the resumed run's own config."""
    tiny = [] if any(arg.startswith("resume=") for arg in args) else [*TINY_TRAIN, ALL]
    result = run_in_process("diffusion-train", *tiny, f"hydra.run.dir={run_dir}", *args,
                            cwd=run_dir.parent, env=env)
    assert result.returncode == 0, result.stderr
    assert "failed" not in result.stdout + result.stderr  # no tracker was dropped
    return result


def tensorboard_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    # purge_orphaned_data=False: a step logged twice stays visible as two events.
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0},
                              purge_orphaned_data=False)
    events.Reload()
    return events


def wandb_history(run_dir):
    """{run id: [history rows]} from the W&B offline files (LevelDB-log records of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    runs = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        rows = runs.setdefault(path.stem.removeprefix("run-"), [])
        data, position, chunks = path.read_bytes(), 7, b""  # 7: the file's own header
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:  # a block's tail too short for a record header
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            if length == kind == 0:
                break
            chunks += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a whole record, or a record's last piece
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunks)
                chunks = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return runs


def mlflow_run(run_dir):
    from mlflow.tracking import MlflowClient

    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def test_every_tracker_reads_back_scalars_and_images_and_a_resume_continues_its_runs(tmp_path, offline):
    run_dir = tmp_path / "run"
    train(run_dir, env=offline)
    logged = {record["step"]: record.get("loss") for record in tracking.read_metrics(run_dir / "metrics.jsonl")}
    # A kill after the step-3 checkpoint: the trackers logged steps 4 to 6, the checkpoint is at 3.
    shutil.copy(run_dir / "checkpoints" / "step_0000003.pt", run_dir / "checkpoints" / "last.pt")
    train(run_dir, f"resume={run_dir}", "trainer.max_steps=8", env=offline)
    steps = metric_steps(run_dir)
    assert steps == [2, 3, 4, 6, 8]

    events = tensorboard_events(run_dir)
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("eval_loss")] == [3, 6, 8]
    assert [e.step for e in events.Scalars("eval_loss_by_t/9")] == [3, 6, 8]
    assert [e.step for e in events.Images("samples")] == [3, 6, 8]
    assert events.Images("reconstructions")[0].width > 0
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir())[-1] == "hparams"

    runs = wandb_history(run_dir)
    assert len(runs) == 1 and len(list(run_dir.glob("wandb/offline-run-*"))) == 2  # one W&B run, resumed
    rows = next(iter(runs.values()))
    assert [row["_step"] for row in rows] == steps
    assert [row["_step"] for row in rows if "samples/_type" in row] == [3, 6, 8]
    # Steps 4 and 6 as first logged (the resume logs them again only to metrics.jsonl), then 8.
    logged[8] = tracking.read_metrics(run_dir / "metrics.jsonl")[-1]["loss"]
    assert [row.get("loss") for row in rows] == [logged[s] for s in steps]
    assert len(list(run_dir.glob("wandb/offline-run-*/files/media/images/samples_*.png"))) == 3

    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6, 8]
    assert run.data.params["schedule.T"] == "20" and run.data.params["model.kind"] == "mlp"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == [
        f"samples/step_000000{s}.png" for s in (3, 6, 8)]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    with open(run_dir / "csv" / "metrics.csv") as file:
        table = list(csv.DictReader(file))
    assert [int(row["step"]) for row in table] == steps
    assert float(table[-1]["eval_loss"]) == pytest.approx(json.loads((run_dir / "result.json").read_text())["eval_loss"])
    with open(run_dir / "csv" / "images.csv") as file:
        images = list(csv.DictReader(file))
    assert [(row["step"], row["tag"]) for row in images][::2] == [("3", "samples"), ("6", "samples"), ("8", "samples")]
    assert all((run_dir / row["file"]).is_file() for row in images)


@pytest.mark.slow
def test_a_branch_starts_new_tracker_runs_with_the_metrics_it_starts_from(tmp_path, offline):
    origin, branch = tmp_path / "origin", tmp_path / "branch"
    train(origin, env=offline)
    train(branch, f"resume={origin}/checkpoints/step_0000003.pt", env=offline)
    assert [e.step for e in tensorboard_events(branch).Scalars("loss")] == [2, 4, 6]
    assert [e.step for e in tensorboard_events(branch).Images("samples")] == [6]  # the origin's grids stay there
    (branch_id, rows), = wandb_history(branch).items()
    assert branch_id not in wandb_history(origin) and [row["_step"] for row in rows] == [2, 3, 4, 6]
    _, origin_run = mlflow_run(origin)
    client, branch_run = mlflow_run(branch)
    assert branch_run.info.run_id != origin_run.info.run_id
    assert [m.step for m in client.get_metric_history(branch_run.info.run_id, "eval_loss")] == [3, 6]


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"logger=wandb needs the wandb package: pip install -e '\.\[wandb\]'"):
        tracking.check_available(OmegaConf.create({"wandb": {}}))
    tracking.check_available(OmegaConf.create({"csv": {}}))  # CSV needs nothing


def test_a_tracker_that_fails_is_a_warning_and_the_others_go_on(tmp_path, caplog):
    class Broken:
        def __init__(self, *args):
            self.state = {}

        def log(self, step, scalars, images):
            raise OSError("disk full")

    tracking.BACKENDS["broken"] = Broken
    try:
        cfg = OmegaConf.create({"logger": {"broken": {}, "csv": {}}})
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
        with tracking.Trackers(cfg, tmp_path, 0) as trackers:
            trackers.log(1, {"loss": 0.5}, {})
            trackers.log(2, {"loss": 0.4}, {})
    finally:
        del tracking.BACKENDS["broken"]
    assert "logger broken failed (OSError: disk full); the run goes on without it" in caplog.text
    assert caplog.text.count("logger broken failed") == 1
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == ["step,loss", "1,0.5"]
