"""A real diffusekit server on a free loopback port, in a thread of the test process (uvicorn)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(**options):
    """Yield ``(base_url, app)`` for a server built from ``ServeConfig(**options)``; stops it afterwards."""
    import uvicorn

    from diffusekit.serve import ServeConfig, create_app

    port = free_port()
    config = ServeConfig(port=port, **options)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)


def wait_idle(app, timeout: float = 60.0) -> None:
    """Wait until the server's worker has nothing running or queued (e.g. the start-up model load)."""
    state = app.state.serve
    deadline = time.monotonic() + timeout
    while state.worker.current is not None or len(state.queue):
        if time.monotonic() > deadline:
            raise TimeoutError("server still busy")
        time.sleep(0.02)


LORA_PATHS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", "up_blocks.1.resnets.0.conv1")


def random_lora(path):
    """A random kohya-format LoRA for two layers of the bundled SD UNet (a Linear and a 3x3 conv)."""
    import torch
    from safetensors.torch import save_file

    from diffusekit import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained("diffusekit-fashion-sd", subfolder="unet")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module_path in LORA_PATHS:
        module = unet.get_submodule(module_path)
        name = "lora_unet_" + module_path.replace(".", "_")
        if isinstance(module, torch.nn.Conv2d):
            down = torch.randn(4, module.in_channels, *module.kernel_size, generator=generator) * 0.5
            up = torch.randn(module.out_channels, 4, 1, 1, generator=generator) * 0.5
        else:
            down = torch.randn(4, module.in_features, generator=generator) * 0.5
            up = torch.randn(module.out_features, 4, generator=generator) * 0.5
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, path)
