"""Command line: ``python -m diffusekit <command>`` (also installed as ``diffusekit``).

  generate MODEL [--prompt TEXT] ...   images from a folder, hub repo, bundled model or single file; PNGs carry
                                       A1111's generation parameters (diffusekit generate --help)
  demo [--out DIR]                     build tiny random-weight models, save them in diffusers format, load them
                                       back and generate: a smoke test of the whole stack that needs no download
  train unconditional|text-to-image    train on Fashion-MNIST, export in diffusers format (diffusekit.training)
  eval ...                             measure sample quality (diffusekit train --help, diffusekit eval --help)
  serve [--models DIR] [--port 7860]   HTTP server: A1111-compatible API, job API, web page (diffusekit[serve])
  batch JOBS.jsonl --model M --out DIR one PNG per JSON-lines job + manifest.jsonl, resumable; --ray for a cluster
  convert SRC DST                      single-file checkpoint (.safetensors/.ckpt) <-> diffusers folder
  quantize MODEL OUT                   int8 copy of a pipeline, calibrated on its own runs (CPU); run it with
                                       --optimize (generate, serve, batch), as any model gets the compiled fast path
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


# command -> module of diffusekit.cli with add_parser(commands) and run(args) -> int. One line per command.
COMMANDS: dict[str, str] = {
    "generate": "generate",
    "quantize": "quantize",
    "demo": "demo",
    "serve": "serve",
    "batch": "batch",
    "convert": "convert",
}


def main(argv: list[str] | None = None) -> int:
    # OpenMP workers that spin while waiting made generation ~10x slower on busy CPU cores (130 s vs 13 s for the
    # README's main job on a shared 2-core machine); this must be set before torch starts its thread pool, so it is
    # done here, in the command-line process only, never on `import diffusekit`. An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["train"], ["eval"]):  # the training tools parse their own arguments (imported only here)
        from .training.cli import main as training_main

        return training_main(argv)
    parser = argparse.ArgumentParser(prog="diffusekit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(f".cli.{module}", __package__) for name, module in COMMANDS.items()}
    for module in modules.values():
        module.add_parser(commands)
    args = parser.parse_args(argv)
    return modules[args.command].run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
