"""Behaviour stays, to the bit: the golden cases of tests/golden_outputs.py, run with this code,
against what main wrote at de2f18b (tests/golden/), and the checkpoints of de2f18b loaded, sampled
and resumed.

The outputs are bitwise equal on the kind of CPU they were recorded on (tests/golden/machine.json:
torch's CPU capability). On another kind, matmul kernels round differently, so the test falls back
to a close comparison there and says so."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
FAST_CASES = ["gradients_fast", "mnist_fast"]  # every sampler; and the old checkpoints' resumes
SLOW_CASES = ["mnist_prompt", "mnist_latent", "mnist_edm", "mnist_class", "mnist_dit_prompt", "mnist_unet_dpmpp",
              "gradients_default"]


def same_machine() -> bool:
    recorded = json.loads((GOLDEN / "machine.json").read_text())["cpu_capability"]
    return recorded == torch.backends.cpu.get_cpu_capability()


def assert_same(actual, expected, where: str) -> None:
    """Equal to the bit (or, on another kind of CPU, close), recursively through dicts."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, torch.Tensor):
        if same_machine():
            assert torch.equal(actual, expected), f"{where}: max |diff| {(actual - expected).abs().max():.3g}"
        else:
            torch.testing.assert_close(actual, expected, atol=2e-3, rtol=0, msg=where)
    elif same_machine():
        assert actual == expected, where
    else:
        assert actual == pytest.approx(expected, rel=1e-3), where


def start(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "golden_outputs.py"), str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, out: Path) -> Path:
    _, stderr = process.communicate(timeout=1800)
    assert process.returncode == 0, stderr[-3000:]
    return out


def produce(out: Path, *args: str) -> Path:
    return finish(start(out, *args), out)


def start_fast_cases(out: Path) -> subprocess.Popen:
    return start(out, *FAST_CASES, "--resume")


@pytest.fixture(scope="module")
def fast_outputs(request, tmp_path_factory) -> Path:
    """The fast cases and the resumed old checkpoints, in one process (started with the session)."""
    started = getattr(request.config, "golden_fast_cases", None)
    return finish(*started) if started else produce(tmp_path_factory.mktemp("golden"), *FAST_CASES, "--resume")


@pytest.mark.parametrize("case", FAST_CASES)
def test_golden_case(fast_outputs, case):
    assert_same(torch.load(fast_outputs / f"{case}.pt"), torch.load(GOLDEN / f"{case}.pt"), case)


def test_old_checkpoints_resume_and_sample(fast_outputs):
    assert_same(torch.load(fast_outputs / "resumed.pt"), torch.load(GOLDEN / "resumed.pt"), "resumed")


def test_old_checkpoints_sample_as_they_did(fast_outputs):
    """A checkpoint of de2f18b, loaded by this code, draws what its case drew then."""
    from golden_outputs import CASES, CHECKPOINTS

    resumed = torch.load(fast_outputs / "resumed.pt")
    for name, case in CHECKPOINTS.items():
        suffix = next(iter(CASES[case][1]))
        assert_same(resumed[name]["loaded"], torch.load(GOLDEN / f"{case}.pt")[f"samples_{suffix or 'default'}"], name)


def start_slow_cases(out: Path) -> subprocess.Popen:
    """The slow cases (the default run's 4,500 steps the most of them) in a process of their own,
    started with the session (conftest.py) when their test is selected, so that they run beside
    the other tests instead of after them; likewise the fast cases."""
    return start(out, *SLOW_CASES)


@pytest.mark.slow
def test_golden_slow_cases(request, tmp_path):
    started = getattr(request.config, "golden_slow_cases", None)
    out = finish(*started) if started else produce(tmp_path, *SLOW_CASES)
    for case in SLOW_CASES:
        assert_same(torch.load(out / f"{case}.pt"), torch.load(GOLDEN / f"{case}.pt"), case)
