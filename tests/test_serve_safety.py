"""diffusekit serve, safe by default: loopback unless a key, API key on every request, body and upload limits,
decompression bombs refused, no CORS unless asked, a clear message when the extra is missing."""

from __future__ import annotations

import base64
import io
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from serve_helpers import running_server, wait_idle  # noqa: E402

KEY = "correct-horse-battery"
ORIGIN = "http://allowed.example"


def test_listening_beyond_loopback_needs_a_key_or_insecure(capsys):
    from diffusekit.__main__ import main
    from diffusekit.serve import ServeConfig

    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        ServeConfig(host=host).check_exposure()
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(ValueError, match="--api-key"):
            ServeConfig(host=host).check_exposure()
        ServeConfig(host=host, api_key=KEY).check_exposure()
        ServeConfig(host=host, insecure=True).check_exposure()
    with pytest.raises(ValueError, match="at least 8"):
        ServeConfig(api_key="short")
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    assert main(["serve", "--models", "/no/such/folder"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["serve", "--model", "../../etc"]) == 2
    assert "unknown model '../../etc'; served models: diffusekit-fashion-ddpm" in capsys.readouterr().err


def test_missing_extra_gives_the_install_command(monkeypatch):
    from diffusekit.serve import require_dependencies

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(ImportError, match=r"pip install 'diffusekit\[serve\]'"):
        require_dependencies()


@pytest.fixture(scope="module")
def locked():
    with running_server(api_key=KEY, max_body_bytes=4096, max_upload_pixels=64 * 64,
                        cors_origins=(ORIGIN,), default_model="diffusekit-fashion-ddpm") as (url, app):
        wait_idle(app)
        yield url


def test_api_key_is_checked_on_every_request(locked):
    import webuiapi

    for path in ("/", "/static/app.js", "/sdapi/v1/sd-models", "/v1/models", "/docs", "/openapi.json"):
        answer = requests.get(locked + path, timeout=30)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"].startswith("Basic")
        assert requests.get(locked + path, headers={"Authorization": "Bearer wrong-key-123"},
                            timeout=30).status_code == 401
    assert requests.post(f"{locked}/sdapi/v1/txt2img", json={}, timeout=30).status_code == 401
    ok = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(f"{locked}/v1/models", headers=ok, timeout=30).status_code == 200
    assert requests.get(f"{locked}/v1/models", headers={"X-API-Key": KEY}, timeout=30).status_code == 200
    assert requests.get(locked + "/", auth=("anyone", KEY), timeout=30).status_code == 200
    api = webuiapi.WebUIApi(baseurl=f"{locked}/sdapi/v1", username="me", password=KEY)
    assert "diffusekit-fashion-ddpm" in api.util_get_model_names()
    assert "detail" in webuiapi.WebUIApi(baseurl=f"{locked}/sdapi/v1").get_progress()  # no key: refused


def test_body_limit_and_upload_limits(locked):
    from PIL import Image

    auth = {"Authorization": f"Bearer {KEY}"}
    big = requests.post(f"{locked}/sdapi/v1/txt2img", data=b"{" + b" " * 10000 + b"}", headers=auth, timeout=30)
    assert big.status_code == 413 and "4096 bytes" in big.json()["detail"]
    chunked = requests.post(f"{locked}/sdapi/v1/txt2img", data=(b" " * 1000 for _ in range(10)), headers=auth,
                            timeout=30)  # no Content-Length: counted as it streams
    assert chunked.status_code == 413

    def upload(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    bomb = base64.b64encode(_png_header_only(100_000, 100_000)).decode()  # claims 10^10 pixels in 70 bytes
    answer = requests.post(f"{locked}/sdapi/v1/png-info", json={"image": bomb}, headers=auth, timeout=30)
    assert answer.status_code == 422 and "decompression bomb refused" in answer.json()["detail"]
    over = base64.b64encode(_png_header_only(100, 100)).decode()  # over this server's --max-upload-pixels
    answer = requests.post(f"{locked}/sdapi/v1/png-info", json={"image": over}, headers=auth, timeout=30)
    assert answer.status_code == 422 and "100x100 = 10000 pixels" in answer.json()["detail"]
    small = Image.new("RGB", (16, 16))
    small.info["parameters"] = "x"
    answer = requests.post(f"{locked}/sdapi/v1/png-info", json={"image": upload(small)}, headers=auth, timeout=30)
    assert answer.status_code == 200


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's announcement)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_cors_only_for_the_allowed_origin(locked):
    auth = {"Authorization": f"Bearer {KEY}"}
    allowed = requests.get(f"{locked}/v1/models", headers={**auth, "Origin": ORIGIN}, timeout=30)
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = requests.get(f"{locked}/v1/models", headers={**auth, "Origin": "http://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_by_default():
    with running_server(default_model="diffusekit-fashion-ddpm") as (url, app):
        answer = requests.get(f"{url}/v1/models", headers={"Origin": "http://evil.example"}, timeout=30)
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
        preflight = requests.options(f"{url}/sdapi/v1/txt2img", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}, timeout=30)
        assert "access-control-allow-origin" not in preflight.headers
        wait_idle(app)
