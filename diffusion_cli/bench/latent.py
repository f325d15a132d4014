"""The latent table: latent diffusion against pixel space at 3x64x64, the same denoiser config
(model=resunet64) on images and on kl_f4's 4x16x16 latents: training images/s (latents cached,
and encoded per batch), the time to sample images (decoding included) and the one-time cost of
encoding a training set."""

import torch
from omegaconf import OmegaConf

from ..data import Split, make_gradients
from ..generation import sample_images
from .timing import compose_train, interleaved, spread, table, timed

SIZE = 64
SAMPLER = OmegaConf.create({"kind": "ddim", "steps": 50, "eta": 0.0, "clip_x0": True})  # the sampling rows'


def bench_latent(device: torch.device, repeats: int, steps: int, quick: bool = False) -> str:
    from ..autoencoder import build_autoencoder, latent_statistics
    from ..spaces import LatentSpace, PixelSpace, Training, encode_all, unchanged
    from ..train import TrainStep

    batch, count = (8, 8) if quick else (64, 512)
    cfg = compose_train(["data=gradients", f"data.height={SIZE}", f"data.width={SIZE}", "model=resunet64",
                         f"trainer.device={device}", f"trainer.batch_size={batch}", "autoencoder=kl_f4"])
    images = make_gradients(count, (3, SIZE, SIZE), seed=0)   # stored as floats in [0, 1]
    # The autoencoder's weights do not change its speed: an untrained kl_f4, its scale measured.
    autoencoder = build_autoencoder(cfg.autoencoder, cfg.data).to(device)
    latent = latent_statistics(autoencoder, images[:batch].to(device) * 2 - 1, False, batch)
    latents = LatentSpace(autoencoder, dict(cfg.autoencoder), (3, SIZE, SIZE), latent, "untrained kl_f4")
    encode_s = timed(lambda: encode_all(latents, images, batch), device)
    encoded = encode_all(latents, images, batch)

    pixels = PixelSpace((3, SIZE, SIZE))
    trainers = {"pixel": TrainStep(cfg, device, Training(Split(images, None), unchanged, False), pixels),
                "latent, cached": TrainStep(cfg, device, Training(Split(encoded, None), unchanged, True), latents),
                "latent, encoded per batch": TrainStep(cfg, device, Training(Split(images, None), latents.encode,
                                                                             False), latents)}
    counters = {name: iter(range(1, 10 ** 9)) for name in trainers}
    seconds = interleaved({name: lambda name=name: [trainers[name](next(counters[name])) for _ in range(steps)]
                           for name in trainers}, repeats, device)
    per_s = {name: [steps * batch / s for s in values] for name, values in seconds.items()}

    sampler = OmegaConf.merge(SAMPLER, {"steps": 2 if quick else SAMPLER.steps})
    draw = {name: (lambda model=trainers[name].model, space=space: sample_images(
        model, trainers["pixel"].task.schedule, sampler, (batch, *space.shape),
        batch_size=batch, seed=0, space=space)) for name, space in (("pixel", pixels), ("latent, cached", latents))}
    sampling = interleaved(draw, max(1, repeats // 2), device)

    rows = []
    for name, trainer in trainers.items():
        shape = "x".join(map(str, trainer.task.space.shape))
        ratio = [s / p for s, p in zip(per_s[name], per_s["pixel"])]
        sampled = sampling.get(name)
        rows.append([name, shape, spread(per_s[name]), spread(ratio, 2),
                     spread(sampled, 2) if sampled else "", spread([p / s for p, s in zip(sampling["pixel"], sampled)], 2)
                     if sampled else ""])
    return (table(["denoiser on", "input", "train img/s", "vs pixel (target >= 4)",
                   f"sampling {batch} images, DDIM {sampler.steps} (s)", "sampling speed-up"], rows)
            + f"\n\nOne-time encoding (autoencoder.cache_latents=true): {count} images in {encode_s:.2f} s, "
              f"{count / encode_s:.0f} images/s.")
