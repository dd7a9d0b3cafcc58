"""The node logic on CUDA (what ComfyUI runs on a GPU), checked against the same calls on the CPU.

A small random Wan-shaped model (head_dim 128) is saved and loaded through the loader node's function
(``load_handle``: fused kernels + CUDA graphs on CUDA); the sampler with decode-as-you-go (tiny random
Wan 2.1 VAE) and the extend node run on CUDA in fp32 and bf16 and are compared with the CPU. Prints one
CHECK line each and exits non-zero on a failure.

    python benchmarks/nodes_gpu_check.py
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from self_forcing.nodes.decode import StreamDecode, VaeViews
from self_forcing.nodes.model import load_handle
from self_forcing.nodes.sampling import RunHooks, extend_video, sample_video
from self_forcing.sf_model.checkpoint import save_model
from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.vae import WanVAE, WanVAEConfig

CFG = TINY.replace(dim=256, num_heads=2, ffn_dim=512, num_layers=3)
VAE_CFG = WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)


def rel(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def random_model() -> CausalWanModel:
    torch.manual_seed(0)
    model = CausalWanModel(CFG, attn_backend="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def random_vae() -> WanVAE:
    torch.manual_seed(1)
    vae = WanVAE(VAE_CFG)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return vae.eval().requires_grad_(False)


def decoder(vae: WanVAE) -> StreamDecode:
    views = VaeViews()

    @contextmanager
    def open_vae(device):
        with views.bind(vae, vae.state_dict(), device, torch.float32) as bound:
            yield bound

    return StreamDecode(open_vae)


def main() -> int:
    cuda = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    cpu = torch.device("cpu")
    path = Path(tempfile.mkdtemp()) / "tiny.safetensors"
    save_model(path, random_model(), CFG, meta={"frames_per_block": 3})
    g = torch.Generator().manual_seed(2)
    cond = [[torch.randn(1, 8, CFG.text_dim, generator=g), {"pooled_output": None}]]
    history = {"samples": torch.randn(1, 16, 6, 4, 8, generator=g) * 2}
    vae = random_vae()
    failures = []

    def check(name, ok, detail):
        print(f"CHECK {name}: {'ok' if ok else 'FAILED'} ({detail})")
        if not ok:
            failures.append(name)

    def handle(device, dtype, keep=False):
        return load_handle(str(path), "tiny", dtype=dtype, attention="auto", load_device=device,
                           offload_device=cpu, keep_loaded=keep, supports_bf16=True)

    ref_h = handle(cpu, "fp32")
    ref_lat, ref_img = sample_video(ref_h, cond, width=64, height=32, length=33, seed=3, decode=decoder(vae))
    ref_ext = extend_video(ref_h, cond, history, extend_frames=12, history_frames=2, resample_strength=0.4, seed=9)
    for dtype, tol, keep in (("fp32", 1e-4, False), ("fp32", 1e-4, True), ("bf16", 3e-2, True)):
        h = handle(cuda, dtype, keep)
        previews = []
        hooks = RunHooks(progress=lambda d, t, p: previews.append(p) if p is not None else None)
        runs = [sample_video(h, cond, width=64, height=32, length=33, seed=3, decode=decoder(vae), hooks=hooks)
                for _ in range(2)]
        (lat, img), (lat2, img2) = runs
        graphs = h.model.chunk_graphs
        tag = f"{dtype} keep_loaded={keep}"
        check(f"t2v latents cuda vs cpu {tag}", rel(lat, ref_lat) < tol, f"rel {rel(lat, ref_lat):.2e}")
        # fp32 convolutions on CUDA run in TF32 by default (PyTorch's cudnn.allow_tf32): ~1e-3
        dec_tol = max(tol, 3e-3)
        check(f"decoded frames cuda vs cpu {tag}", img.shape == ref_img.shape and rel(img, ref_img) < dec_tol,
              f"{tuple(img.shape)} rel {rel(img, ref_img):.2e}")
        check(f"second run identical {tag}", torch.equal(lat, lat2) and torch.equal(img, img2), "same seed")
        check(f"previews per chunk {tag}", len(previews) == 6, f"{len(previews)} previews")
        if cuda.type == "cuda":
            check(f"CUDA graphs used {tag}", graphs is not None and graphs.replayed > 0 and graphs.failed is None,
                  f"recorded {graphs.recorded}, replayed {graphs.replayed}, failed {graphs.failed}")
        check(f"model parked after the run {tag}", h.model.device.type == (cuda.type if keep else "cpu"),
              f"on {h.model.device}")
        ext = extend_video(h, cond, history, extend_frames=12, history_frames=2, resample_strength=0.4, seed=9)
        check(f"extend cuda vs cpu {tag}", rel(ext, ref_ext) < tol and torch.equal(ext[:, :, :4], ref_ext[:, :, :4]),
              f"rel {rel(ext, ref_ext):.2e}, untouched history bit-identical")
    print("ALL NODE CHECKS PASSED" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
