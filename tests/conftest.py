import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real MNIST in torchvision's layout lies beside the checkout; CI sets the same variable.
# Made absolute: the CLI tests run in other working directories.
os.environ["DIFFUSION_CLI_DATA"] = os.path.abspath(
    os.environ.get("DIFFUSION_CLI_DATA", ROOT.parent / "shared" / "data"))

# A cache of this test session, so tests never read or write the user's ~/.cache.
os.environ["DIFFUSION_CLI_CACHE"] = tempfile.mkdtemp(prefix="diffusion-cli-cache-")

# A whole training run in a few seconds on 2 CPU cores: the debug=fast preset users have (6 steps,
# every output once), 20 noise levels, on the CPU whatever the machine has. A warm-up longer than
# the run keeps the learning rate independent of trainer.max_steps, so that a run stopped early and
# resumed with more steps is the same run as a straight one.
TINY_TRAIN = ["debug=fast", "schedule.T=20", "trainer.device=cpu", "trainer.lr_warmup_steps=100"]


def data_config(kind: str, **values):
    """The composed `data` group of data=kind, with `values` set."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import diffusion_cli.config  # noqa: F401  registers the schemas

    with initialize_config_module("diffusion_cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"data={kind}"]).data
    OmegaConf.resolve(cfg)
    cfg.merge_with(values)
    return cfg


def snapshot(directory: Path) -> dict:
    """Every file under `directory`: its bytes and modification time (to check nothing changed)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


def metric_steps(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl's lines ([] without the file; a line cut off by a kill skipped)."""
    from diffusion_cli.tracking import read_metrics

    return [record["step"] for record in read_metrics(run_dir / "metrics.jsonl")]


def script(name: str) -> str:
    """The console script installed beside this Python."""
    return str(Path(sys.executable).with_name(name))


def run_cli(name: str, *args: str, cwd: Path, check: bool = True, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    result = subprocess.run([script(name), *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "", **(env or {})}, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny gradients run shared by the tests that need a checkpoint."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_cli("diffusion-train", *TINY_TRAIN, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    return run_dir


def has_mnist() -> bool:
    return os.path.isdir(os.path.join(os.environ["DIFFUSION_CLI_DATA"], "MNIST"))


@pytest.fixture(scope="session")
def mnist_classifier():
    """The classifier the package ships; returns (model, its entry)."""
    if not has_mnist():
        pytest.skip("no MNIST beside the checkout")
    from diffusion_cli import classifier

    return classifier.load_classifier(os.environ["DIFFUSION_CLI_DATA"], False)


def run_in_process(name: str, *args: str, cwd: Path, env: dict | None = None
                   ) -> subprocess.CompletedProcess:
    """A console script's entry point called in this process (no interpreter start: about 0.2 s,
    not 5), with its exit code and output, as run_cli gives them."""
    import contextlib
    import io

    from hydra.core.global_hydra import GlobalHydra

    from diffusion_cli import sample, score, train

    entry = {"diffusion-train": train.cli, "diffusion-sample": sample.cli, "diffusion-eval": score.cli}[name]
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = dict(os.environ), list(sys.argv), os.getcwd()
    os.environ.update({"HYDRA_FULL_ERROR": "", **(env or {})})
    sys.argv = [name, *args]
    os.chdir(cwd)
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        sys.argv = saved[1]
        os.chdir(saved[2])
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


def pytest_collection_finish(session):
    """Start the golden processes of the selected golden tests now, beside the other tests, where
    the machine has cores to spare: on a few cores they and the tests fight over the same ones
    (each torch process runs a thread per core, spinning while it waits) and everything beside
    them runs several times slower, so there the golden tests start their processes themselves."""
    import test_golden

    names = {item.name.partition("[")[0] for item in session.items}
    session.config.golden = {}
    if (os.cpu_count() or 1) < 8:
        return
    for test in names & test_golden.PROCESSES.keys():
        out = Path(tempfile.mkdtemp(prefix="golden_"))
        session.config.golden[test] = (test_golden.start(test, out), out)


def pytest_sessionfinish(session):
    import shutil

    for process, out in getattr(session.config, "golden", {}).values():
        process.kill()  # a no-op when a test has waited for it
        process.wait()
        shutil.rmtree(out, ignore_errors=True)
