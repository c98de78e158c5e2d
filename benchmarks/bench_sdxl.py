"""Issue 14 (SDXL): one ``UNet2DConditionModel`` step of the full-size SDXL base architecture, diffusekit vs diffusers.

The UNet (``stabilityai/stable-diffusion-xl-base-1.0`` unet/config.json, 2.57G parameters, ~10 GB in float32) is
built once with seeded random weights by diffusers; diffusekit's UNet is built on the meta device and takes **the
same tensors** (``load_state_dict(..., assign=True)``), so one copy of the weights serves both and the memory peak is
~11 GB instead of 21 (no folder is written: 10 GB of safetensors would cost more disk and time than the step).
Inputs: batch 2 (the classifier-free-guidance batch), a 77x2048 text context, pooled text (2, 1280) and six size
time ids, as ``StableDiffusionXLPipeline`` feeds them; timestep 500.

Benchmarks (names for ``--only``): ``unet`` at latents ``--sizes`` (default 32 and 128: 256² and 1024² images).

Run it alone on the machine: ``python -m benchmarks.bench_sdxl``; ``--quick`` checks
the harness on a tiny SDXL-shaped config.
"""

from __future__ import annotations

import sys

from .common import (OURS, THEIRS, Report, common_args, interleaved, max_abs_diff, quiet_environment, run_benchmarks,
                     set_threads)

LIBS = (OURS, THEIRS)

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (keys with diffusers' defaults left out)
SDXL_UNET = {
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "upcast_attention": None, "use_linear_projection": True,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
QUICK_UNET = {**SDXL_UNET, "block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4],
              "cross_attention_dim": 64, "transformer_layers_per_block": [1, 2, 2], "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 32 + 6 * 8, "norm_num_groups": 16}
POOLED = {"full": 1280, "quick": 32}


def shared_unets(config: dict):
    """(ours, theirs) on the same weight tensors: diffusers builds and seeds them, ours takes them as they are."""
    import diffusers
    import torch

    import diffusekit

    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    with torch.device("meta"):
        ours = diffusekit.UNet2DConditionModel(**config)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    assert not missing and not unexpected
    return {OURS: ours.eval(), THEIRS: theirs}


def bench_unet(report: Report, args) -> None:
    import torch

    config = QUICK_UNET if args.quick else SDXL_UNET
    models = shared_unets(config)
    params = sum(p.numel() for p in models[OURS].parameters())
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=gen)
    added = {"text_embeds": torch.randn(2, POOLED["quick" if args.quick else "full"], generator=gen),
             "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}
    t = torch.tensor(500)
    sizes = [8, 16] if args.quick else [int(s) for s in args.sizes.split(",")]
    for size in sizes:
        x = torch.randn(2, 4, size, size, generator=gen)

        def run(lib, x=x):
            with torch.no_grad():
                return models[lib](x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

        diff = max_abs_diff(run(OURS), run(THEIRS))  # also the warm-up
        default = 2 if args.quick else (3 if size <= 64 else 1)
        stats = interleaved({lib: (lambda lib=lib: run(lib)) for lib in LIBS}, repeat=args.repeat or default,
                            warmup=0)
        report.time_row(f"SDXL base UNet step ({params / 1e9:.2f}G params), latents {size}x{size} ({size * 8}² "
                        "image), batch 2", stats, note=f"max abs diff {diff:.1e}")
    models.clear()


BENCHMARKS = {"unet": bench_unet}


def main(argv: list[str] | None = None) -> None:
    parser = common_args(__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,128", help="latent sizes (default 32,128: 256² and 1024² images)")
    args = parser.parse_args(argv)
    quiet_environment(args.threads)
    set_threads(args.threads)
    report = Report("SDXL: full-size base UNet, random weights (shared by both libraries)", args,
                    ["-m", "benchmarks.bench_sdxl", *(sys.argv[1:] if argv is None else argv)])
    run_benchmarks(BENCHMARKS, report, args)


if __name__ == "__main__":
    main()
