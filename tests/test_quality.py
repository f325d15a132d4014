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


@pytest.mark.slow  # reads the MNIST test set and classifies 3200 digits (~10 s)
def test_the_shipped_classifier_knows_mnist_and_the_metrics_tell_real_from_broken(mnist_classifier):
    classifier, entry = mnist_classifier
    assert entry["test_accuracy"] > 0.99
    images, labels = load_mnist(os.environ["DIFFUSION_CLI_DATA"], False, train=False)
    real = mnist_quality(images[:500], classifier, entry, labels[:500])
    assert real["confident_frac"] > 0.95 and real["class_entropy"] > 3.2 and real["label_accuracy"] > 0.98
    torch.testing.assert_close(classifier(images[:100]).argmax(1), labels[:100], atol=0, rtol=0)
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


def test_the_package_ships_the_classifier_and_loads_it_without_training(monkeypatch):
    from diffusion_cli import classifier

    assert classifier.sha256(classifier.SHIPPED) == classifier.SHIPPED_SHA256
    monkeypatch.setattr(classifier, "train_classifier", lambda *args: pytest.fail("trained a classifier"))
    model, entry = classifier.load_classifier("no-data-needed", False)
    assert entry["version"] == classifier.VERSION and entry["test_mean"].shape == (classifier.FEATURES,)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_an_altered_shipped_classifier_is_not_trusted_and_is_trained_instead(monkeypatch, tmp_path, caplog):
    from diffusion_cli import classifier

    altered = tmp_path / "mnist_classifier_v1.pt"
    altered.write_bytes(classifier.SHIPPED.read_bytes()[:-10])  # truncated
    monkeypatch.setattr(classifier, "SHIPPED", altered)
    monkeypatch.setenv("DIFFUSION_CLI_CACHE", str(tmp_path / "cache"))
    fake = (torch.rand(64, 1, 28, 28), torch.arange(64) % 10)
    monkeypatch.setattr(classifier, "load_mnist", lambda root, download, train: fake)
    trained = classifier.train_classifier
    monkeypatch.setattr(classifier, "train_classifier", lambda root, download: trained(root, download, steps=2))
    _, entry = classifier.load_classifier("unused", False)
    assert "fails its checksum" in caplog.text
    assert (tmp_path / "cache" / "mnist_classifier_v1.pt").exists() and entry["version"] == classifier.VERSION


def test_auto_quality_images_cost_at_most_a_tenth_of_the_training():
    """num_quality_images=auto: as many images as 10% of the training's model evaluations (a
    trained image counts 3) pay for at the sampler's evaluations per image, at most 256; a number
    given wins."""
    from omegaconf import OmegaConf

    from diffusion_cli.evaluate import quality_count

    def cfg(sampler, **trainer):
        return OmegaConf.create({"sampler": sampler, "trainer": {
            "num_quality_images": "auto", "max_steps": 20, "batch_size": 16, "grad_accum": 1, **trainer}})

    sde = {"kind": "dpmpp_2m", "steps": 10, "eta": 1.0, "clip_x0": True}
    assert quality_count(cfg(sde), 1000) == 9                       # 0.1 x 3 x 20 x 16 / 10
    assert quality_count(cfg({"kind": "heun", "steps": 10, "clip_x0": True}), 1000) == 4   # 20 evaluations
    assert quality_count(cfg({"kind": "ddpm", "steps": None, "clip_x0": True}), 1000) == 0
    assert quality_count(cfg(sde, grad_accum=2), 1000) == 19
    assert quality_count(cfg(sde, max_steps=1506, batch_size=128), 1000) == 256
    assert quality_count(cfg(sde, num_quality_images=1000), 1000) == 1000
