"""``diffusekit serve``: an HTTP API that AUTOMATIC1111 clients speak, a job API with progress streams, a web page.

Needs the optional extra ``pip install 'diffusekit[serve]'`` (FastAPI + uvicorn), imported only when the server is
built. Layout:

- :mod:`.config`   -- :class:`ServeConfig`: models folder, limits, security options (safe defaults)
- :mod:`.models`   -- which models may be served (bundled + folders in ``--models DIR``), one loaded at a time
- :mod:`.previews` -- per-VAE linear latent -> RGB projection for every-step previews
- :mod:`.jobs`     -- bounded job queue and the worker thread that runs :func:`diffusekit.generation.generate`
- :mod:`.images`   -- base64 / PNG in and out, with size limits on uploads
- :mod:`.a1111`    -- ``/sdapi/v1/*`` routes (A1111's field names and defaults)
- :mod:`.jobs_api` -- ``/v1/*`` routes (jobs, server-sent events, models)
- :mod:`.app`      -- ``create_app(config)``: routes, auth, body limit, CORS, the web page in ``static/``
"""

from __future__ import annotations

__all__ = ["ServeConfig", "create_app", "require_dependencies", "serve"]

_MISSING = ("diffusekit serve needs FastAPI and uvicorn, which are optional: install them with "
            "pip install 'diffusekit[serve]'")


def require_dependencies() -> None:
    """Raise ``ImportError`` with the install command when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{_MISSING} (missing: {exc.name})") from exc


def __getattr__(name: str):
    if name == "ServeConfig":
        from .config import ServeConfig

        return ServeConfig
    if name == "create_app":
        require_dependencies()
        from .app import create_app

        return create_app
    if name == "serve":
        require_dependencies()
        from .app import serve

        return serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
