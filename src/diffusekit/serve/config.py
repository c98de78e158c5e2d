"""Server settings: where models come from, request limits and who may connect (safe by default)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass
class ServeConfig:
    """Everything ``diffusekit serve`` can be told. The defaults are the safe ones.

    Limits apply to every request (A1111 routes and jobs alike) and answer with a 4xx naming the limit:
    ``max_pixels`` (width × height of one image), ``max_steps``, ``max_images`` (batch_size × n_iter),
    ``max_body_bytes`` (request body, 413), ``max_upload_pixels`` (decoded size of an uploaded image; larger ones,
    decompression bombs included, are refused before decoding), ``queue_size`` (jobs waiting; a full queue answers
    429), ``keep_jobs`` (finished jobs kept for ``GET /v1/jobs/{id}``; the oldest are dropped).
    """

    models_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    insecure: bool = False
    cors_origins: tuple[str, ...] = ()
    device: str = "cpu"
    optimize: bool = False  # pipe.optimize() on every model loaded (--optimize)
    default_model: str | None = None
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_images: int = 16
    max_body_bytes: int = 32 * 1024 * 1024
    max_upload_pixels: int = 4096 * 4096
    queue_size: int = 16
    keep_jobs: int = 64

    def __post_init__(self) -> None:
        if self.models_dir is not None:
            self.models_dir = Path(self.models_dir).expanduser()
            if not self.models_dir.is_dir():
                raise ValueError(f"--models {self.models_dir}: no such folder; pass a folder holding model folders")
        self.cors_origins = tuple(self.cors_origins or ())
        for name in ("max_pixels", "max_steps", "max_images", "max_body_bytes", "max_upload_pixels", "queue_size",
                     "keep_jobs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{name} must be a positive int, got {value!r}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("--api-key must be at least 8 characters long")

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback without an API key, unless ``insecure`` says so on purpose."""
        if not is_loopback(self.host) and self.api_key is None and not self.insecure:
            raise ValueError(
                f"--host {self.host} makes the server reachable from other machines: pass --api-key KEY (checked "
                "on every request) or, on a trusted network only, --insecure"
            )
