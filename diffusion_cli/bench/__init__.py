"""diffusion-bench: the speed of the project's training step, samplers and models, each against a
baseline measured in the same process, interleaved, so machine noise hits both alike. Prints
Markdown tables: medians with (min-max) over the repetitions, and the ratios the targets are on.

    diffusion-bench                  # all five tables (minutes on 2 CPU cores)
    diffusion-bench train            # project training step vs a bare loop
    diffusion-bench sample           # sampler step overhead vs a floor loop (and diffusers)
    diffusion-bench model            # U-Net images/s and peak memory (and diffusers' UNet2DModel)
    diffusion-bench data             # images in memory vs streamed; streaming memory as data grows
    diffusion-bench latent           # latent diffusion vs pixel space at 3x64x64: training, sampling

diffusers is optional (`pip install diffusion-cli[bench]`); without it its rows are left out.
"""

import argparse

from ..errors import UserError
from ..runtime import PRECISIONS, resolve_device
from .data import bench_data
from .latent import SIZE as LATENT_SIZE, bench_latent
from .models import QUICK_BATCH, bench_model, bench_presets
from .samplers import SAMPLE_SHAPE, bench_sample
from .timing import BATCH, describe
from .train import bench_train


TABLES = ("train", "sample", "model", "data", "latent")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="diffusion-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="*", metavar="{train,sample,model,data,latent}",
                        help="which tables (default: all five)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions per arm (default 7)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per repetition (default 10)")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="autocast of the train and model tables' forward passes (default fp32)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny counts, numbers meaningless")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device, key="--device")
    except UserError as error:
        parser.error(str(error))
    tables = args.tables or list(TABLES)
    if set(tables) - set(TABLES):
        parser.error(f"unknown table {sorted(set(tables) - set(TABLES))[0]!r}: choose from {', '.join(TABLES)}")
    repeats, steps = (1, 1) if args.quick else (args.repeats, args.steps)
    print(describe(device, repeats) + f", precision {args.precision}")
    if "train" in tables:
        models = ["resunet"] if args.quick else ["resunet", "unet"]
        print(f"\n## train: images/s at batch {BATCH}, {steps} steps per repetition\n")
        print(bench_train(device, repeats, steps, models, args.precision))
    if "sample" in tables:
        T, ddim_steps = (20, 5) if args.quick else (1000, 50)
        print(f"\n## sample: a trivial model (x * 0.1), batch {'x'.join(map(str, SAMPLE_SHAPE))}, "
              f"DDPM {T} steps, DDIM {ddim_steps} steps\n")
        print(bench_sample(device, repeats, ddim_steps, T))
    if "model" in tables:
        batch = QUICK_BATCH if args.quick else BATCH
        print(f"\n## model: MNIST 1x28x28 at batch {batch}, {steps} steps per repetition\n")
        print(bench_model(device, repeats, steps, args.precision, quick=args.quick))
        batch = QUICK_BATCH if args.quick else 32
        print(f"\n## model presets: RGB at batch {batch}, {steps} steps per repetition\n")
        print(bench_presets(device, repeats, steps, batch=batch, presets_only=args.quick))
    if "data" in tables:
        counts = (64,) if args.quick else (2000, 20000)
        print(f"\n## data: a folder of gradient PNGs, batch {BATCH}, {steps} steps per repetition; "
              f"the MLP (width 256) so that reading weighs most\n")
        print(bench_data(device, repeats, steps, counts, args.quick))
    if "latent" in tables:
        print(f"\n## latent: 3x{LATENT_SIZE}x{LATENT_SIZE}, model=resunet64 on pixels and on kl_f4 latents, "
              f"{steps} steps per repetition\n")
        print(bench_latent(device, repeats, steps, args.quick))


if __name__ == "__main__":
    main()
