"""Weight download logic against a local fake Hugging Face Hub (a folder served on 127.0.0.1).

Never touches the network: the fake hub answers the two requests huggingface_hub makes (HEAD for the
metadata, GET with Range for the bytes) from files in a temporary folder, and records them.
"""

import argparse
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from self_forcing.sf_model import weights
from self_forcing.cli import download as cli
from self_forcing.sf_model.checkpoint import load_model
from self_forcing.sf_model.config import TINY

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# A bare .pt carries no config: the loader infers it from shapes assuming Wan's head_dim 128.
WAN_SHAPED = TINY.replace(dim=128, ffn_dim=256, num_heads=1, num_layers=1)


class FakeHub:
    """Serves ROOT/<repo_id>/<path> at /<repo_id>/resolve/<rev>/<path> like the Hub (HEAD + ranged GET)."""

    def __init__(self, root: Path):
        self.root = root
        self.requests = []
        self.drop_first_get_after = None  # bytes sent before the first GET is cut off (simulated drop)
        self.wrong_etag = False
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _file(self):
                parts = self.path.split("?")[0].lstrip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return None
                path = hub.root / parts[0] / parts[1] / "/".join(parts[4:])
                return path if path.is_file() else None

            def _head(self, f, status=200, length=None, extra=None):
                data = f.read_bytes()
                etag = hashlib.sha256(data + (b"x" if hub.wrong_etag else b"")).hexdigest()
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.send_header("Accept-Ranges", "bytes")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                return data

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path, None))
                f = self._file()
                if f is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._head(f)

            def do_GET(self):
                rng = self.headers.get("Range")
                hub.requests.append(("GET", self.path, rng))
                f = self._file()
                if f is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = f.stat().st_size
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                extra = {"Content-Range": f"bytes {start}-{size - 1}/{size}"} if rng else None
                data = self._head(f, 206 if rng else 200, size - start, extra)[start:]
                gets = sum(1 for r in hub.requests if r[0] == "GET")
                if hub.drop_first_get_after is not None and gets == 1:
                    self.wfile.write(data[:hub.drop_first_get_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, path: str, data: bytes) -> str:
        target = self.root / repo_id / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    h = FakeHub(tmp_path / "hub")
    yield h
    h.close()


def spec(key="vae", name="tiny_vae.safetensors", folder="vae", path="split/tiny_vae.safetensors", sha=None,
         convert=False, repo="test-org/test-repo"):
    return weights.OfficialFile(key=key, name=name, folder=folder, repo_id=repo, repo_path=path, sha256=sha,
                                size=None, description=f"test file {name}", convert=convert)


def folders(models: Path):
    return lambda f: str(models / f.folder)


def payload(n=300_000, seed=0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes()


def test_download_checks_pinned_checksum_and_places_the_file(hub, tmp_path):
    data = payload()
    sha = hub.add("test-org/test-repo", "split/tiny_vae.safetensors", data)
    models = tmp_path / "models"
    paths = weights.ensure_files([spec(sha=sha)], folders(models), endpoint=hub.url, log=lambda m: None)
    assert paths == [models / "vae" / "tiny_vae.safetensors"]
    assert paths[0].read_bytes() == data
    assert not (models / weights.STAGING).exists()  # staging folder cleaned up
    assert [r[0] for r in hub.requests].count("GET") == 1


def test_checksum_mismatch_deletes_the_download_and_says_so(hub, tmp_path):
    hub.add("test-org/test-repo", "split/tiny_vae.safetensors", payload())
    models = tmp_path / "models"
    with pytest.raises(weights.WeightsError, match="checksum mismatch") as e:
        weights.ensure_files([spec(sha="0" * 64)], folders(models), endpoint=hub.url, log=lambda m: None)
    assert "run again" in str(e.value)
    assert not (models / "vae" / "tiny_vae.safetensors").exists()
    assert not list((models / weights.STAGING).rglob("tiny_vae.safetensors"))


def test_unpinned_file_is_checked_against_the_hubs_checksum(hub, tmp_path):
    hub.add("test-org/test-repo", "split/tiny_vae.safetensors", payload())
    hub.wrong_etag = True  # the Hub's LFS sha256 does not match the bytes served
    with pytest.raises(weights.WeightsError, match="checksum mismatch"):
        weights.ensure_files([spec(sha=None)], folders(tmp_path / "m"), endpoint=hub.url, log=lambda m: None)
    hub.wrong_etag = False
    path = weights.fetch(spec(sha=None), tmp_path / "m" / "vae", endpoint=hub.url)
    assert path.read_bytes() == payload()


def test_interrupted_download_resumes_with_a_range_request(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub writes whole 10 MB chunks; smaller ones let a small file be cut mid-way
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 32 * 1024)
    data = payload(400_000, seed=1)
    sha = hub.add("test-org/test-repo", "split/tiny_vae.safetensors", data)
    hub.drop_first_get_after = 150_000
    models = tmp_path / "models"
    try:
        weights.ensure_files([spec(sha=sha)], folders(models), endpoint=hub.url, log=lambda m: None)
    except weights.WeightsError:  # huggingface_hub may give up on the dropped connection: run again
        weights.ensure_files([spec(sha=sha)], folders(models), endpoint=hub.url, log=lambda m: None)
    assert (models / "vae" / "tiny_vae.safetensors").read_bytes() == data
    ranges = [r[2] for r in hub.requests if r[0] == "GET" and r[2]]
    assert ranges and int(ranges[-1].split("=")[1].split("-")[0]) > 0  # continued, not restarted


def test_official_checkpoint_is_converted_to_safetensors(hub, tmp_path, make_tiny):
    model = make_tiny(WAN_SHAPED)
    ckpt = {"generator_ema": {f"model.{k}": v.clone() for k, v in model.state_dict().items()}}
    pt = tmp_path / "sf.pt"
    torch.save(ckpt, pt)
    sha = hub.add("gdhe17/Self-Forcing", "checkpoints/tiny_sf.pt", pt.read_bytes())
    f = spec(key="self-forcing", name="tiny_sf.safetensors", folder="diffusion_models",
             path="checkpoints/tiny_sf.pt", sha=sha, convert=True, repo="gdhe17/Self-Forcing")
    models = tmp_path / "models"
    (out,) = weights.ensure_files([f], folders(models), endpoint=hub.url, dtype="bf16", log=lambda m: None)
    assert out.suffix == ".safetensors"
    loaded = load_model(out, device="cpu", dtype=None)
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.config == model.config.replace(text_len=512)  # text_len is not in the weights: Wan's 512
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v.to(torch.bfloat16)), k
    assert loaded.meta["converted_from"]["sha256"] == sha
    assert loaded.meta["frames_per_block"] == 3
    assert not list(models.rglob("*.pt"))  # the source is not kept by default


def test_offline_mode_fails_at_once_naming_every_missing_file_and_folder(hub, tmp_path, monkeypatch):
    models = tmp_path / "models"
    present = spec(key="a", name="present.safetensors", folder="vae")
    (models / "vae").mkdir(parents=True)
    (models / "vae" / "present.safetensors").write_bytes(b"x")
    missing = [spec(key="b", name="dit.safetensors", folder="diffusion_models", convert=True),
               spec(key="c", name="umt5.safetensors", folder="text_encoders")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(weights.WeightsUnavailable) as e:
        weights.ensure_files([present, *missing], folders(models), endpoint=hub.url, log=lambda m: None)
    text = str(e.value)
    for f in missing:
        assert f.name in text and str(models / f.folder) in text and f.url in text
    assert "present.safetensors" not in text
    assert hub.requests == []  # no connection attempted at all


def test_unreachable_hub_fails_after_one_attempt(tmp_path):
    """A server that hangs up on every connection: one attempt, no retry loop, then the manual-fetch text."""
    attempts = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            attempts.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    endpoint = f"http://127.0.0.1:{srv.getsockname()[1]}"
    files = [spec(key="b", name="dit.safetensors", folder="diffusion_models"), spec()]
    try:
        with pytest.raises(weights.WeightsUnavailable) as e:
            weights.ensure_files(files, folders(tmp_path / "models"), endpoint=endpoint, log=lambda m: None)
    finally:
        srv.close()
    assert len(attempts) == 1
    assert "unreachable" in str(e.value)
    for f in files:
        assert f.name in str(e.value) and str(tmp_path / "models" / f.folder) in str(e.value)


def test_missing_file_on_the_hub_is_an_error_not_offline(hub, tmp_path):
    with pytest.raises(weights.WeightsError) as e:
        weights.ensure_files([spec(sha="0" * 64)], folders(tmp_path / "m"), endpoint=hub.url, log=lambda m: None)
    assert not isinstance(e.value, weights.WeightsUnavailable)
    assert "split/tiny_vae.safetensors" in str(e.value) and "404" in str(e.value)


def test_present_files_need_no_network(tmp_path):
    models = tmp_path / "models"
    (models / "vae").mkdir(parents=True)
    (models / "vae" / "tiny_vae.safetensors").write_bytes(b"x")
    out = weights.ensure_files([spec()], folders(models), endpoint="http://127.0.0.1:9", log=lambda m: None)
    assert out == [models / "vae" / "tiny_vae.safetensors"]


def test_official_table_names_the_real_files():
    names = {f.name: f for f in weights.OFFICIAL_FILES}
    assert names["self_forcing_dmd.safetensors"].repo_id == "gdhe17/Self-Forcing"
    assert names["self_forcing_dmd.safetensors"].repo_path.endswith(".pt") and names["self_forcing_dmd.safetensors"].convert
    assert names["wan_2.1_vae.safetensors"].folder == "vae"
    assert names["umt5_xxl_fp8_e4m3fn_scaled.safetensors"].folder == "text_encoders"
    assert all(len(f.sha256) == 64 for f in weights.OFFICIAL_FILES)
    assert weights.preferred_dir(["/m/unet", "/m/diffusion_models"], "diffusion_models") == "/m/diffusion_models"


# -- the CLI subcommand -----------------------------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser(prog="self-forcing")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(sub)
    return parser.parse_args(argv)


@pytest.fixture
def fake_official(hub, monkeypatch, make_tiny, tmp_path):
    model = make_tiny(WAN_SHAPED)
    pt = tmp_path / "src.pt"
    torch.save({"generator_ema": {f"model.{k}": v for k, v in model.state_dict().items()}}, pt)
    sf = spec(key="self-forcing", name="sf.safetensors", folder="diffusion_models", path="ck/sf.pt",
              sha=hub.add("test-org/test-repo", "ck/sf.pt", pt.read_bytes()), convert=True)
    vae = spec(sha=hub.add("test-org/test-repo", "split/tiny_vae.safetensors", payload()))
    monkeypatch.setattr(weights, "OFFICIAL_FILES", (sf, vae))
    monkeypatch.setattr(weights, "SELF_FORCING", sf)
    return {"sf": sf, "vae": vae, "pt": pt, "model": model}


def test_cli_downloads_into_the_models_folder(hub, fake_official, tmp_path, capsys):
    models = tmp_path / "ComfyUI" / "models"
    args = _parse(["download", "--models-dir", str(models), "--endpoint", hub.url])
    assert args.func(args) == cli.EXIT_OK
    assert (models / "vae" / "tiny_vae.safetensors").read_bytes() == payload()
    assert load_model(models / "diffusion_models" / "sf.safetensors").model.dtype == torch.bfloat16
    args = _parse(["download", "--models-dir", str(models), "--endpoint", hub.url, "--only", "vae"])
    before = len(hub.requests)
    assert args.func(args) == cli.EXIT_OK and len(hub.requests) == before  # present: skipped, no request
    assert "present:" in capsys.readouterr().out


def test_cli_offline_exit_code_and_instructions(fake_official, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _parse(["download", "--models-dir", str(tmp_path / "models")])
    assert args.func(args) == cli.EXIT_OFFLINE
    err = capsys.readouterr().err
    assert "sf.safetensors" in err and str(tmp_path / "models" / "diffusion_models") in err
    assert "tiny_vae.safetensors" in err and str(tmp_path / "models" / "vae") in err


def test_cli_converts_a_local_pt_and_lists(fake_official, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models"
    args = _parse(["download", "--models-dir", str(models), "--from-file", str(fake_official["pt"]),
                   "--only", "self-forcing", "--dtype", "fp32"])
    assert args.func(args) == cli.EXIT_OK
    loaded = load_model(models / "diffusion_models" / "sf.safetensors")
    for k, v in fake_official["model"].state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    args = _parse(["download", "--list", "--models-dir", str(models)])
    assert args.func(args) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "sf.safetensors" in out and fake_official["vae"].url in out


def test_cli_needs_a_models_dir_outside_comfyui(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_MODELS_DIR", raising=False)
    args = _parse(["download"])
    assert args.func(args) == cli.EXIT_FAILED
    assert "--models-dir" in capsys.readouterr().err
    monkeypatch.setenv("COMFYUI_MODELS_DIR", "/some/ComfyUI/models")
    assert cli.default_models_dir() == Path("/some/ComfyUI/models")


@pytest.mark.parametrize("name", ["../../escaped.safetensors", "sub/x.safetensors", "..", ""])
def test_a_target_name_with_a_folder_part_is_refused_before_downloading(hub, tmp_path, name):
    data = payload(1000)
    sha = hub.add("test-org/test-repo", "split/tiny_vae.safetensors", data)
    models = tmp_path / "a" / "b" / "models"
    with pytest.raises(weights.WeightsError, match="plain file name"):
        weights.fetch(spec(sha=sha, name=name), models / "vae", endpoint=hub.url)
    assert not [r for r in hub.requests if r[0] == "GET"]  # nothing was downloaded
    assert not (tmp_path / "a" / "escaped.safetensors").exists() and not (tmp_path / "a" / "b" / "escaped.safetensors").exists()
