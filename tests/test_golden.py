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


# The golden processes, by the test that reads their outputs: the fast cases with the resumed old
# checkpoints, and the slow cases (the default run's 4,500 steps the most of them). conftest.py
# starts those the session selects when it starts, so that they run beside the other tests.
PROCESSES = {"test_golden_case": [*FAST_CASES, "--resume"], "test_golden_slow_cases": SLOW_CASES}


def start(test: str, out: Path) -> subprocess.Popen:
    """golden_outputs.py writing `test`'s outputs into out/ (its console output into out/log.txt)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as log:
        return subprocess.Popen([sys.executable, str(HERE / "golden_outputs.py"), str(out), *PROCESSES[test]],
                                stdout=log, stderr=subprocess.STDOUT)


def outputs(config, test: str, out: Path) -> Path:
    """Where `test`'s outputs are, once the process started for it with the session has ended (or,
    where none was, a process started now)."""
    process, out = config.golden.get(test) or (start(test, out), out)
    assert process.wait(timeout=1800) == 0, (out / "log.txt").read_text()[-3000:]
    return out


@pytest.fixture(scope="module")
def fast_outputs(request, tmp_path_factory) -> Path:
    return outputs(request.config, "test_golden_case", tmp_path_factory.mktemp("golden"))


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


@pytest.mark.slow
def test_golden_slow_cases(request, tmp_path):
    out = outputs(request.config, "test_golden_slow_cases", tmp_path)
    for case in SLOW_CASES:
        assert_same(torch.load(out / f"{case}.pt"), torch.load(GOLDEN / f"{case}.pt"), case)
