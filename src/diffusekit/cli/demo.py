"""``diffusekit demo``: build tiny random-weight models, save them in diffusers format, load them back and sample."""

from __future__ import annotations

from pathlib import Path


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="end-to-end smoke run on tiny random-weight models")
    demo.add_argument("--out", default="out")
    demo.add_argument("--steps", type=int, default=25)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")


def run(args) -> int:
    import torch

    from ..utils import image_grid
    from ..models.unet_2d import UNet2DModel
    from ..pipelines.ddpm import DDPMPipeline
    from ..schedulers.ddpm import DDPMScheduler

    out = Path(args.out)
    print("demo: smoke run on a tiny RANDOM-WEIGHT UNet2DModel (expect noise images; trained models: diffusekit generate diffusekit-fashion-ddpm)")
    torch.manual_seed(args.seed)
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(out / "tiny-ddpm")
    print(f"demo: saved a diffusers-format pipeline to {out / 'tiny-ddpm'}; loading it back and sampling")
    pipe = DDPMPipeline.from_pretrained(out / "tiny-ddpm").to(args.device)
    images = pipe(batch_size=4, num_inference_steps=args.steps, generator=torch.manual_seed(args.seed)).images
    image_grid(images).save(out / "ddpm-grid.png")
    print(f"demo: wrote {out / 'ddpm-grid.png'}")
    return 0
