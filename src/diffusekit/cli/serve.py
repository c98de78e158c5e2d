"""``diffusekit serve``: HTTP server with an A1111-compatible API, a job queue and a web page (diffusekit[serve])."""

from __future__ import annotations

import os
import sys


def add_parser(commands) -> None:
    serve = commands.add_parser("serve", help="HTTP server: A1111-compatible API, job queue and web page")
    serve.add_argument("--models", default=None, metavar="DIR",
                       help="folder of models to serve besides the bundled ones: diffusers folders and SD "
                            "single files (.safetensors/.ckpt); LoRA files in DIR/Lora, embeddings in DIR/embeddings")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--api-key", default=os.environ.get("DIFFUSEKIT_API_KEY"),
                       help="key every request must carry (Bearer, X-API-Key or Basic password); needed to "
                            "listen beyond loopback (default: $DIFFUSEKIT_API_KEY)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browser pages from ORIGIN to call the API (repeatable; default: none)")
    serve.add_argument("--model", default=None, help="model loaded at start (default: first in --models, else "
                                                      "diffusekit-fashion-sd)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--optimize", action="store_true",
                       help="run every model on the compiled fast path (pipe.optimize(); int8 kernels for models "
                            "written by diffusekit quantize): the first request of each size builds its code once per "
                            "machine (minutes on a CPU), later ones and later servers load it in seconds")
    serve.add_argument("--max-pixels", type=int, default=2048 * 2048, help="largest width*height per image")
    serve.add_argument("--max-steps", type=int, default=150)
    serve.add_argument("--max-images", type=int, default=16, help="largest batch_size*n_iter per request")
    serve.add_argument("--max-body-mb", type=int, default=32, help="largest request body, MiB")
    serve.add_argument("--queue-size", type=int, default=16, help="jobs that may wait; more get 429")


def run(args) -> int:
    from ..serve import ServeConfig, require_dependencies

    try:
        require_dependencies()
    except ImportError as exc:
        print(f"diffusekit serve: {exc}", file=sys.stderr)
        return 2
    from ..serve.app import serve

    try:
        config = ServeConfig(
            models_dir=args.models, host=args.host, port=args.port, api_key=args.api_key, insecure=args.insecure,
            cors_origins=tuple(args.cors_origin), device=args.device, optimize=args.optimize,
            default_model=args.model,
            max_pixels=args.max_pixels, max_steps=args.max_steps, max_images=args.max_images,
            max_body_bytes=args.max_body_mb * 1024 * 1024, queue_size=args.queue_size)
        config.check_exposure()
        if args.model:
            from ..serve.models import ModelRegistry

            ModelRegistry(config.models_dir).resolve(args.model)
    except (ValueError, LookupError) as exc:
        print(f"diffusekit serve: {exc}", file=sys.stderr)
        return 2
    serve(config)
    return 0
