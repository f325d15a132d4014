"""The Fréchet distance and the MNIST classifier metrics."""

import os

import pytest
import torch

from diffusion_cli.data import load_mnist
from diffusion_cli.metrics import frechet_distance, mnist_quality


def test_frechet_distance_of_one_dimensional_gaussians_is_closed_form():
    # FD(N(m1, s1^2), N(m2, s2^2)) = (m1 - m2)^2 + (s1 - s2)^2
    fd = frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), torch.tensor([[9.0]]))
    assert abs(fd - (4 + 1)) < 1e-9


def test_frechet_distance_is_zero_for_the_same_gaussian_and_symmetric():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 6, generator=generator), torch.randn(500, 6, generator=generator) * 2 + 1
    stats_a, stats_b = (a.mean(0), a.T.cov()), (b.mean(0), b.T.cov())
    assert abs(frechet_distance(*stats_a, *stats_a)) < 1e-8
    assert abs(frechet_distance(*stats_a, *stats_b) - frechet_distance(*stats_b, *stats_a)) < 1e-8
    # Non-commuting covariances: compare with the definition through the matrix square root.
    cov_a, cov_b = stats_a[1].double(), stats_b[1].double()
    values, vectors = torch.linalg.eig(cov_a @ cov_b)
    trace_root = (vectors @ torch.diag(values.sqrt()) @ torch.linalg.inv(vectors)).trace().real
    expected = (stats_a[0] - stats_b[0]).double().pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    assert abs(frechet_distance(*stats_a, *stats_b) - expected.item()) < 1e-6


@pytest.mark.slow  # trains the stand-in classifier on MNIST (~40 s)
def test_the_classifier_learns_mnist_and_the_metrics_tell_real_from_broken(mnist_classifier):
    classifier, entry = mnist_classifier
    assert entry["test_accuracy"] > 0.9  # 200 steps; the real one (1500 steps) scores about 0.99
    images, labels = load_mnist(os.environ["DIFFUSION_CLI_DATA"], False, train=False)
    real = mnist_quality(images[:500], classifier, entry, labels[:500])
    assert real["confident_frac"] > 0.8 and real["class_entropy"] > 3.2 and real["label_accuracy"] > 0.9
    noise = mnist_quality(torch.rand(500, 1, 28, 28), classifier, entry)
    assert noise["classifier_fd"] > 10 * real["classifier_fd"]
    ones = images[:2000][labels[:2000] == 1][:200]
    collapsed = mnist_quality(ones, classifier, entry)
    assert collapsed["class_entropy"] < 1.0  # one digit only: the mode-collapse alarm
    assert collapsed["classifier_fd"] > real["classifier_fd"]


def test_training_the_classifier_leaves_the_global_random_state_alone(monkeypatch):
    """It may be trained inside a training run (its first quality measurement), whose resume
    must stay exact."""
    from diffusion_cli import classifier

    fake = (torch.rand(64, 1, 28, 28), torch.arange(64) % 10)
    monkeypatch.setattr(classifier, "load_mnist", lambda root, download, train: fake)
    before = torch.get_rng_state()
    first = classifier.train_classifier("unused", False, steps=2)
    assert torch.equal(torch.get_rng_state(), before)
    second = classifier.train_classifier("unused", False, steps=2)
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])  # still seeded
