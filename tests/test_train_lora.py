"""LoRA on the generator (training.lora): only the adapters train, merging is W + alpha/rank * B A, and the
exported LoRA file has the keys ComfyUI's core loader maps for a Wan model and, applied as ComfyUI applies it,
gives the merged export's forward.

The ComfyUI facts are read from ComfyUI commit a125cd84b054a57729b5eecab930ca9408719832 (0.3.64):
``comfy/lora.py`` ``model_lora_keys_unet`` maps, for every state-dict key ``diffusion_model.X.weight`` of any
model (Wan has no model-specific entries), the LoRA names ``lora_unet_<X with '.' -> '_'>`` and
``diffusion_model.X`` to that weight; ``load_lora`` reads ``<name>.alpha``; ``comfy/weight_adapter/lora.py``
reads ``<name>.lora_up.weight`` (mat1) and ``<name>.lora_down.weight`` (mat2) and adds
``alpha / mat2.shape[0] * mat1 @ mat2`` (times the strength) to the weight; ``comfy/ldm/wan/model.py`` names
the block linears ``self_attn.{q,k,v,o}``, ``cross_attn.{q,k,v,o}`` and ``ffn.0``/``ffn.2`` as we do.
"""

import copy

import pytest
import torch
from safetensors.torch import load_file

from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.noise import chunk_noise
from self_forcing.sf_model.sampler import StreamOptions
from self_forcing.sf_model.schedule import make_steps
from self_forcing.training.config import LORA_TARGETS, LoraConfig, load_config
from self_forcing.training.dmd import dmd_gradient, dmd_loss, rollout
from self_forcing.training.lora import (apply_lora, count_parameters, lora_weights, merge_lora, read_lora,
                                        save_lora)
from self_forcing.training.models import build_model, load_dit, save_dit


CPU = torch.device("cpu")
OPTS = StreamOptions()
STEPS = make_steps(OPTS.steps, OPTS.shift, OPTS.warp)
COMFY_COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"


def base_model(seed=0):
    model = build_model(TINY, seed, CPU)
    with torch.no_grad():  # a non-zero head, so outputs depend on every block
        model.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed + 100))
    return model


def randomize_adapters(model, seed=3, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def inputs(batch=1, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY.in_dim, 3, 4, 4, generator=g)
    t = torch.tensor([[700.0, 700.0, 700.0]] * batch)
    ctx = torch.randn(batch, 5, TINY.text_dim, generator=g)
    return x, t, ctx


def forward(model):
    with torch.no_grad():
        return model(*inputs())


# -- applying -------------------------------------------------------------------------------------
def test_only_adapters_require_grad_and_the_wrapped_model_starts_equal():
    base = base_model()
    model = apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=8.0), seed=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.{t}.lora_{ab}.default.weight" for i in range(TINY.num_layers) for t in LORA_TARGETS
                for ab in "AB"}
    assert trainable == expected
    d, f = TINY.dim, TINY.ffn_dim
    per_block = 8 * 4 * (d + d) + 4 * (d + f) + 4 * (f + d)
    n_train, n_total = count_parameters(model)
    assert n_train == TINY.num_layers * per_block
    assert n_total == count_parameters(base)[1] + n_train
    assert torch.equal(forward(model), forward(base))  # B = 0
    # the same seed gives the same adapters (every process of a run starts equal without a broadcast)
    again = apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=8.0), seed=1)
    other = apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=8.0), seed=2)
    a = model.blocks[1].ffn[2].lora_A["default"].weight.detach()
    assert torch.equal(a, again.blocks[1].ffn[2].lora_A["default"].weight)
    assert not torch.equal(a, other.blocks[1].ffn[2].lora_A["default"].weight)
    assert float(a.abs().max()) <= 1.0 / TINY.ffn_dim ** 0.5


def test_targets_subset_and_fused_models_are_refused():
    model = apply_lora(base_model(), LoraConfig(rank=2, targets=("cross_attn.k", "ffn.0")))
    assert set(lora_weights(model)) == {f"blocks.{i}.{t}" for i in range(TINY.num_layers)
                                        for t in ("cross_attn.k", "ffn.0")}
    assert type(model.blocks[0].self_attn.q) is torch.nn.Linear
    with pytest.raises(ValueError, match="LoRA already applied"):
        apply_lora(model, LoraConfig(rank=2, targets=("ffn.0",)))
    fused = base_model().fuse_qkv()
    with pytest.raises(ValueError, match="fused"):
        apply_lora(fused, LoraConfig(rank=2))
    with pytest.raises(ValueError, match="lora.targets"):
        load_config(overrides=['lora.targets=["ffn.1"]'])
    with pytest.raises(ValueError, match="rank"):
        load_config(overrides=["lora.rank=0"])


# -- training ---------------------------------------------------------------------------------------
def test_a_dmd_generator_step_changes_only_the_adapters():
    """Two generator updates through the real rollout (sampler, KV cache) and the DMD loss, optimising what
    requires gradient (as ``engine.Trainable`` does): the base weights stay bit-identical, A and B move."""
    torch.manual_seed(0)
    gen = apply_lora(base_model(), LoraConfig(rank=4, alpha=4.0, dropout=0.1), seed=1).train()
    base_before = {n: p.detach().clone() for n, p in gen.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in gen.named_parameters() if p.requires_grad}
    fake, real = base_model(7).eval(), base_model(8).eval()
    params = [p for p in gen.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(2, 5, TINY.text_dim, generator=g)
    noise = torch.randn(2, TINY.in_dim, 6, 4, 4, generator=g)

    def noise_for(block, frames, count):
        return [torch.cat([n, n * 0.5]) for n in chunk_noise(1, block, count, (1, TINY.in_dim, frames, 4, 4), "cpu")]

    for _ in range(2):
        video = rollout(gen, gen.encode_text(cond), batch=2, clip_shape=(TINY.in_dim, 6, 4, 4), steps=STEPS,
                        opts=OPTS, exit_index=1, noise_for=noise_for, grad=True, cache_dtype=torch.float32)
        grad, _ = dmd_gradient(video, fake, real, cond, torch.zeros_like(cond), torch.tensor([0.3, 0.8]), noise,
                               guidance=3.0)
        dmd_loss(video, grad).backward()
        assert all(p.grad is None for n, p in gen.named_parameters() if n in base_before)
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = dict(gen.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base_before.items())
    for kind in ("lora_A", "lora_B"):
        moved = [n for n, v in lora_before.items() if f".{kind}." in n and not torch.equal(after[n], v)]
        assert len(moved) == len(lora_before) // 2, kind


# -- merging ----------------------------------------------------------------------------------------
def test_merge_is_base_plus_scaled_up_down_and_leaves_plain_keys():
    base = base_model()
    model = randomize_adapters(apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=6.0), seed=1))
    with_lora = forward(model)
    assert not torch.allclose(with_lora, forward(base), atol=1e-4)
    weights = lora_weights(model)
    merge_lora(model)
    assert set(model.state_dict()) == set(base.state_dict())
    assert not any(p.requires_grad for p in model.parameters()) and "peft_config" not in vars(model)
    merged, orig = model.state_dict(), base.state_dict()
    for key, w in orig.items():
        name = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and name in weights:
            lw = weights[name]
            assert lw.alpha == pytest.approx(6.0) and lw.rank == 4
            expected = w + (6.0 / 4) * lw.up @ lw.down
            torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
            assert not torch.equal(merged[key], w)
        else:
            assert torch.equal(merged[key], w), key
    torch.testing.assert_close(forward(model), with_lora, rtol=0, atol=1e-5)
    # merged, the model fuses for inference as any other
    fused = copy.deepcopy(model).fuse_qkv()
    torch.testing.assert_close(forward(fused), with_lora, rtol=0, atol=1e-5)


# -- ComfyUI's LoRA format ----------------------------------------------------------------------------
def comfy_key_map(bare_state_dict) -> dict[str, str]:
    """The names ComfyUI's ``model_lora_keys_unet`` (commit above) accepts for a Wan model whose state dict
    is ``diffusion_model.`` + our bare keys, each mapped to the weight it patches."""
    out = {}
    for k in bare_state_dict:
        full = "diffusion_model." + k
        if full.endswith(".weight"):
            stem = full[len("diffusion_model."):-len(".weight")]
            out["lora_unet_" + stem.replace(".", "_")] = full
            out[full[:-len(".weight")]] = full
        else:
            out[full] = full
    return out


def test_lora_file_keys_are_what_comfyui_maps_for_wan(tmp_path):
    base = base_model()
    model = randomize_adapters(apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=6.0), seed=1))
    path = save_lora(str(tmp_path / "x_lora.safetensors"), model, {"base": "ode_init.safetensors"})
    sd = load_file(path)
    # spelled out for block 0, as a ComfyUI user sees them
    for t in ("self_attn.q", "self_attn.o", "cross_attn.v", "ffn.0", "ffn.2"):
        for suffix in ("lora_up.weight", "lora_down.weight", "alpha"):
            assert f"diffusion_model.blocks.0.{t}.{suffix}" in sd
    key_map = comfy_key_map(base.state_dict())
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert len(names) == TINY.num_layers * len(LORA_TARGETS)
    weights = base.state_dict()
    for x in names:
        assert x in key_map, x
        target = key_map[x]
        # every key of the file is consumed by load_lora (no 'lora key not loaded' warnings)
        assert {f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.alpha"} <= set(sd)
        up, down, alpha = sd[f"{x}.lora_up.weight"], sd[f"{x}.lora_down.weight"], sd[f"{x}.alpha"]
        w = weights[target[len("diffusion_model."):]]
        assert up.shape == (w.shape[0], 4) and down.shape == (4, w.shape[1]) and alpha.ndim == 0
        assert float(alpha) == pytest.approx(6.0) and alpha.dtype == torch.float32
    assert len(sd) == 3 * len(names)
    # comfy/lora_convert.py rewrites only Wan-Fun files (keys starting 'lora_unet__'): ours pass unchanged
    assert not any(k.startswith("lora_unet__") for k in sd)
    read, meta = read_lora(path)
    assert meta["base"] == "ode_init.safetensors" and meta["rank"] == 4 and meta["modules"] == len(names)
    for name, lw in lora_weights(model).items():
        assert torch.equal(read[name].up, lw.up) and torch.equal(read[name].down, lw.down)


def apply_like_comfyui(base_sd: dict, lora_sd: dict, strength: float = 1.0) -> dict:
    """ComfyUI's arithmetic on our files: W + strength * alpha / rank * up @ down (in float32)."""
    key_map = comfy_key_map(base_sd)
    out = {k: v.clone().float() for k, v in base_sd.items()}
    for k in lora_sd:
        if k.endswith(".lora_up.weight"):
            x = k[:-len(".lora_up.weight")]
            up, down = lora_sd[k].float(), lora_sd[f"{x}.lora_down.weight"].float()
            alpha = float(lora_sd[f"{x}.alpha"])
            target = key_map[x][len("diffusion_model."):]
            out[target] += strength * (alpha / down.shape[0]) * (up @ down).reshape(out[target].shape)
    return out


def test_lora_file_applied_as_comfyui_does_equals_the_merged_export(tmp_path):
    """Tolerance: float32 files, forward max |diff| <= 1e-5 (the merge adds the same product in float32)."""
    base = base_model()
    base_path = str(tmp_path / "base.safetensors")
    save_dit(base_path, base, TINY, "causal_init")
    model = randomize_adapters(apply_lora(load_dit(base_path, CPU)[0], LoraConfig(rank=4, alpha=2.0), seed=1))
    lora_path = save_lora(str(tmp_path / "sf_lora.safetensors"), model, dtype=torch.float32)
    merged_path = str(tmp_path / "sf.safetensors")
    save_dit(merged_path, merge_lora(model), TINY, "self_forcing", dtype=torch.float32)
    merged, _ = load_dit(merged_path, CPU)
    by_hand = copy.deepcopy(base)
    by_hand.load_state_dict(apply_like_comfyui(load_file(base_path), load_file(lora_path)))
    out = forward(by_hand)
    assert not torch.allclose(out, forward(base), atol=1e-3)
    torch.testing.assert_close(out, forward(merged), rtol=0, atol=1e-5)


# -- the export flow ----------------------------------------------------------------------------------
def test_export_writes_merged_and_lora_files(tmp_path):
    from self_forcing.sf_model.checkpoint import load_model
    from self_forcing.training.data import make_world
    from self_forcing.training.dmd import self_forcing_path
    from self_forcing.training.export import export_model, lora_export_path, model_card
    from self_forcing.training.lora import lora_path, save_and_merge

    data = {"run": {"out_dir": str(tmp_path / "run"), "progress": False},
            "model": TINY.to_dict(), "world": {"size": 16, "frames": 6},
            "lora": {"enabled": True, "rank": 4, "alpha": 4.0}}
    cfg = load_config(data=data)
    world = make_world(cfg)
    base = base_model()
    gen = randomize_adapters(apply_lora(copy.deepcopy(base), cfg.lora, seed=cfg.run.seed))
    expected = forward(gen)
    (tmp_path / "run").mkdir()
    save_dit(self_forcing_path(cfg), copy.deepcopy(base), TINY, "self_forcing")
    with pytest.raises(ValueError, match="did not train LoRA"):  # enabled, but no adapters were saved
        export_model(cfg, world, self_forcing_path(cfg), str(tmp_path / "none.safetensors"))
    assert not (tmp_path / "none.safetensors").exists()
    # the end of a LoRA dmd stage: adapters to lora_path, the merged generator as the stage output
    merged = save_and_merge(gen, lora_path(cfg), {"base": "ode_init.safetensors"})
    save_dit(self_forcing_path(cfg), merged, TINY, "self_forcing")
    path = export_model(cfg, world, self_forcing_path(cfg), str(tmp_path / "out" / "sf_toy.safetensors"))
    lora_file = lora_export_path(path)
    assert lora_file == str(tmp_path / "out" / "sf_toy_lora.safetensors")
    loaded = load_model(path)
    assert loaded.meta["role"] == "self_forcing" and not any("lora" in k for k in loaded.model.state_dict())
    sd = load_file(lora_file)
    assert {v.dtype for k, v in sd.items() if k.endswith(".weight")} == {torch.float16}  # export.dtype
    _, meta = read_lora(lora_file)
    assert meta["base"] == "ode_init.safetensors" and meta["frames_per_block"] == cfg.sampling.frames_per_block
    assert meta["name"] == "self-forcing-toy-lora"
    # both fp16 exports give the LoRA model's forward (tolerance: fp16 weights, 2e-3 on outputs of ~0.1)
    torch.testing.assert_close(forward(loaded.model.float()), expected, rtol=0, atol=2e-3)
    by_hand = copy.deepcopy(base)
    by_hand.load_state_dict(apply_like_comfyui(base.state_dict(), sd))
    torch.testing.assert_close(forward(by_hand), expected, rtol=0, atol=2e-3)
    assert "Generator trained as LoRA: rank 4" in model_card(cfg, loaded.meta)


# -- through the trainer's engine ---------------------------------------------------------------------
def test_trainable_trains_only_the_adapters_and_exports_them_merged(tmp_path):
    """``engine.Trainable`` optimises and shadows (EMA) only what requires gradient, checkpoints only that
    (the frozen base comes back from its own file), and its EMA model splits into a LoRA file + merged model."""
    from self_forcing.training.engine import Runtime, Trainable
    from self_forcing.training.lora import save_and_merge

    base = base_model()
    gen = apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=4.0), seed=1)
    tr = Trainable("generator", gen, Runtime(device=CPU), lr=1e-2, weight_decay=0.01, ema_decay=0.5)
    assert {id(p) for p in tr.params} == {id(p) for n, p in gen.named_parameters() if ".lora_" in n}
    assert set(tr.ema.shadow) == {n for n, _ in gen.named_parameters() if ".lora_" in n}
    x, t, ctx = inputs(batch=2)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    for _ in range(3):
        with tr.autocast():
            loss = torch.nn.functional.mse_loss(tr.wrapped(x, t, ctx), target)
        loss.backward()
        tr.step()
    tensors, _ = tr.checkpoint_state()
    assert {k for k in tensors if k.startswith("model/")} == {f"model/{n}" for n in tr.ema.shadow}
    ema = tr.ema_model()
    lw = lora_weights(ema)
    for n, v in tr.ema.shadow.items():  # the EMA model carries the EMA adapters, not the live ones
        module, ab = n.split(".lora_")
        assert torch.equal(lw[module].down if ab.startswith("A") else lw[module].up, v)
    merged = save_and_merge(ema, str(tmp_path / "g_lora.safetensors"))
    sd, orig = merged.state_dict(), base.state_dict()
    assert set(sd) == set(orig)
    changed = {k for k in orig if not torch.equal(sd[k], orig[k])}
    assert changed == {f"{n}.weight" for n in lw}
    read, _ = read_lora(str(tmp_path / "g_lora.safetensors"))
    for n, w in read.items():
        torch.testing.assert_close(sd[f"{n}.weight"], orig[f"{n}.weight"] + w.delta(), rtol=0, atol=1e-6)


FSDP_WORKER = '''
import copy, os, sys
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from self_forcing.sf_model.config import WanConfig
from self_forcing.training.config import LoraConfig
from self_forcing.training.distributed import init_group
from self_forcing.training.engine import Runtime, Trainable, shutdown
from self_forcing.training.lora import apply_lora, save_and_merge

out, world = sys.argv[1], int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
cpu = torch.device("cpu")
if world > 1:
    init_group(cpu, world, rank)
    rt = Runtime(cpu, "fp32", rank, world, rank, parallel="fsdp", group=True)
else:
    rt = Runtime(cpu)
cfg = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, text_len=4, freq_dim=32)
from self_forcing.training.models import build_model
base = build_model(cfg, 0, cpu)
with torch.no_grad():
    base.head.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
model = apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=4.0), seed=1)
tr = Trainable("g", model, rt, lr=1e-2, weight_decay=0.01, ema_decay=0.5)
if world > 1:
    assert isinstance(model.blocks[0].self_attn.q.lora_A["default"].weight, DTensor)
g = torch.Generator().manual_seed(1)
x, ctx = torch.randn(4, 16, 3, 4, 4, generator=g), torch.randn(4, 4, 16, generator=g)
t, target = torch.full((4, 3), 500.0), torch.randn(4, 16, 3, 4, 4, generator=g)
mine = slice(rank * 4 // world, (rank + 1) * 4 // world)  # each process its share of the same batch
for _ in range(3):
    loss = F.mse_loss(tr.wrapped(x[mine], t[mine], ctx[mine]), target[mine])
    loss.backward()
    tr.step()
tensors, _ = tr.checkpoint_state()
assert all(".lora_" in k for k in tensors if k.startswith("model/")), sorted(tensors)[:4]
tr.prepare_export()
if rank == 0:
    merged = save_and_merge(tr.ema_model(), os.path.join(out, "lora.safetensors"))
    torch.save({"merged": merged.state_dict(), "base": base.state_dict()}, os.path.join(out, "merged.pt"))
if world > 1:
    shutdown(rt)
print("lora ok", flush=True)
'''


def test_lora_under_fsdp2_two_processes_match_one(tmp_path):
    """Two gloo processes (FSDP2, each half of the batch) == one plain process on the whole batch: the same
    merged weights (float reassociation of the gradient sums: <= 1e-5), the base untouched in both."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    results = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        out.mkdir()
        extra = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world)) if world > 1 else {}
        procs = [subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**env, **extra, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
        texts = [p.communicate(timeout=300)[0] for p in procs]
        for p, text in zip(procs, texts):
            assert p.returncode == 0 and "lora ok" in text, text[-4000:]
        results[world] = torch.load(out / "merged.pt")
    one, two = results[1], results[2]
    changed = {k for k in one["base"] if not torch.equal(one["merged"][k], one["base"][k])}
    assert changed and all(".ffn." in k or "_attn." in k for k in changed)
    for k, v in one["merged"].items():
        if k in changed:
            torch.testing.assert_close(two["merged"][k], v, rtol=0, atol=1e-5)
        else:
            assert torch.equal(two["merged"][k], v), k


def test_the_dmd_stage_trains_lora_and_writes_adapters_plus_merged_model(tmp_path):
    """``[lora] enabled`` through the real stage (``train_dmd``): the base stays frozen, the adapters move, the
    stage writes the ComfyUI LoRA file and the merged generator, and merged == starting weights + scale B A."""
    from self_forcing.sf_model.checkpoint import load_model
    from self_forcing.training.data import make_world
    from self_forcing.training.dmd import train_dmd
    from self_forcing.training.engine import init_runtime
    from self_forcing.training.lora import lora_path

    out = tmp_path / "run"
    out.mkdir()
    data = {"run": {"out_dir": str(out), "progress": False, "checkpoint_every": 100},
            "model": TINY.to_dict(), "world": {"size": 16, "frames": 6},
            "sampling": {"frames_per_block": 3},
            "dmd": {"steps": 5, "batch_size": 1, "critic_ratio": 2, "lr": 1e-3, "lr_critic": 1e-3, "ema_decay": 0.5,
                    "ema_start": 0},
            "lora": {"enabled": True, "rank": 4, "alpha": 4.0}}
    cfg = load_config(data=data)
    world = make_world(cfg)
    start, teacher = str(tmp_path / "gen.safetensors"), str(tmp_path / "teacher.safetensors")
    save_dit(start, base_model(0), TINY, "ode_init")
    save_dit(teacher, base_model(1), TINY, "teacher")
    path = train_dmd(cfg, init_runtime("cpu"), world, start, teacher, teacher)
    adapters, _ = read_lora(lora_path(cfg))
    assert adapters and any(float(w.up.abs().max()) > 0 for w in adapters.values())  # B started at 0, trained
    merged = load_model(path).model.state_dict()
    base = load_model(start).model.state_dict()
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        w = adapters[name]
        delta = w.alpha / w.rank * w.up.float() @ w.down.float()
        torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + delta, rtol=0, atol=1e-5)
    untouched = [k for k in base if "blocks." not in k]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)  # no adapters outside blocks
