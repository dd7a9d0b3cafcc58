"""CUDA check of `self-forcing generate` (run on the GPU machine, e.g. from benchmarks/pending_gpu.sh; not a CI test)."""
import os, subprocess, sys, tempfile, time
import numpy as np, torch
from self_forcing.sf_model.config import WanConfig, WAN_1_3B
from self_forcing.sf_model.model import CausalWanModel
from self_forcing.sf_model.checkpoint import save_model, load_model
from self_forcing.sf_model.vae import WanVAE, WanVAEConfig, save_vae, load_vae
from self_forcing.sf_model.speed import use_fused_kernels
from self_forcing.sf_model.pipeline import stream_video
from self_forcing.sf_model.sampler import StreamOptions
from self_forcing.sf_model.text_embeds import save_text_embeds
from self_forcing.cli import main

root = tempfile.mkdtemp(prefix="cli_check_")
def rand_(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            gain = 1.0 if n.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")) else 0.0
            p.copy_(gain + 0.2 * torch.randn(p.shape, generator=g))
    return m

cfg = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, freq_dim=64)
save_model(f"{root}/dit.safetensors", rand_(CausalWanModel(cfg), 1), cfg)
vae = rand_(WanVAE(WanVAEConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)), 2)
with torch.no_grad():
    for p in vae.parameters(): p.mul_(1.5)
save_vae(f"{root}/vae.safetensors", vae)
ctx = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(3))
save_text_embeds(f"{root}/e.safetensors", ctx)

def cli(*extra):
    argv = ["generate", "--model", f"{root}/dit.safetensors", "--vae", f"{root}/vae.safetensors", "--embeds",
            f"{root}/e.safetensors", "--width", "64", "--height", "48", "--frames", "9", "--seed", "4", "--no-progress", *extra]
    t = time.time(); rc = main(argv); return rc, time.time() - t

def ref(dtype, fused):
    m = load_model(f"{root}/dit.safetensors", device="cuda", dtype=dtype).model
    if fused: use_fused_kernels(m)
    v = load_vae(f"{root}/vae.safetensors", device="cuda", dtype=dtype)
    opts = StreamOptions(frames_per_block=3, partial_last_chunk=True)
    return torch.cat([c.frames[0] for c in stream_video(m, v, ctx.cuda(), num_frames=9, height=6, width=8, seed=4, options=opts)]).numpy()

for dtype, name, fused in ((torch.float32, "fp32", False), (torch.bfloat16, "bf16", False), (torch.bfloat16, "bf16", True)):
    extra = ["--fused-kernels"] if fused else []
    rc, dt = cli("--device", "cuda", "--dtype", name, "--raw", f"{root}/o.rgb", *extra)
    got = np.fromfile(f"{root}/o.rgb", np.uint8)
    r = ref(dtype, fused)
    print(f"CHECK {name} fused={fused}: rc={rc} bytes={got.size} expected={r.size} equal={np.array_equal(got, r.reshape(-1))} "
          f"std={r.std():.1f} {dt:.1f}s", flush=True)
# cpu vs cuda fp32 closeness
rc, _ = cli("--device", "cpu", "--raw", f"{root}/c.rgb")
a = np.fromfile(f"{root}/c.rgb", np.uint8).astype(int); b = ref(torch.float32, False).reshape(-1).astype(int)
print(f"CHECK cpu vs cuda fp32: max {np.abs(a-b).max()} mean {np.abs(a-b).mean():.4f}", flush=True)
# toy model on cuda, raw to a pipe through stdout
p = subprocess.run([sys.executable, "-m", "self_forcing.cli", "generate", "--device", "cuda", "--frames", "24",
                    "--raw", "-", "--no-progress", "--fused-kernels", "--dtype", "bf16"], capture_output=True)
print(f"CHECK toy cuda stdout: rc={p.returncode} bytes={len(p.stdout)} expected={24*64*64*3}", p.stderr.decode()[-400:], flush=True)
# real 1.3B size (random weights): time to stream 21 latent frames at 832x480, raw to /dev/null
if os.environ.get("BIG"):
    big = CausalWanModel(WAN_1_3B).to(torch.bfloat16)
    save_model(f"{root}/big.safetensors", big, WAN_1_3B); del big
    save_text_embeds(f"{root}/big_e.safetensors", torch.randn(1, 40, 4096) * 0.1)
    from self_forcing.sf_model.vae import WAN21_VAE
    bv = WanVAE(WAN21_VAE); save_vae(f"{root}/bigvae.safetensors", bv); del bv
    for extra in ([], ["--fused-kernels"]):
        t = time.time()
        rc = main(["generate", "--model", f"{root}/big.safetensors", "--vae", f"{root}/bigvae.safetensors", "--embeds",
                   f"{root}/big_e.safetensors", "--device", "cuda", "--dtype", "bf16", "--raw", "/dev/null", "--no-progress", *extra])
        print(f"CHECK 1.3B 832x480 21 latent (81 frames) {extra}: rc={rc} {time.time()-t:.1f}s incl. load", flush=True)
