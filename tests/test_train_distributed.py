"""Several CPU processes under torchrun (gloo, FSDP2): the same training as one process with gradient
accumulation, sharded checkpoints that resume exactly, and resumes on another number of processes.

Stages: teacher, ODE pairs (sharded), ODE init and Self Forcing DMD (rollouts through the FSDP2-registered
``forward_chunk``/``encode_text``). References:

- one process under FSDP2 (a 1-process group: ``run.optimizer_offload`` asks for it; CPUOffloadPolicy, EMA
  on the CPU) with ``grad_accum = 2`` == two processes with ``grad_accum = 1``, bit for bit;
- one plain process (no process group, no FSDP) agrees up to float reassociation: FSDP2's autograd hooks
  change the order in which gradient contributions are summed, which Adam amplifies on the near-zero
  gradients of the first steps (measured: max |dw| 4.5e-5, mean 3e-7 at lr 1e-3); losses and gradient norms
  agree to 1e-5.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from self_forcing.training.engine import read_full_checkpoint, read_jsonl

WORKER = textwrap.dedent('''
    import json, sys
    from self_forcing.training.config import load_config
    from self_forcing.training.engine import init_runtime, shutdown
    from self_forcing.training.data import RandomWorld
    from self_forcing.training.stages import run_stages

    args = json.loads(sys.argv[1])
    cfg = load_config(data=args["config"])
    rt = init_runtime("cpu", optimizer_offload=args["offload"], ema_on_cpu=args["offload"])
    assert rt.fsdp == (rt.world_size > 1 or args["offload"])
    run_stages(cfg, args["stages"], rt, RandomWorld(clip_mean=0.3), stop_after=args["stop_after"])
    shutdown(rt)
''')
ALL = ["teacher", "ode_pairs", "ode_init", "dmd"]
PARTS = (("teacher", "teacher"), ("ode_init", "student"), ("dmd", "generator"), ("dmd", "critic"))


def config(out_dir, accum, every=100):
    opt = {"batch_size": 1, "grad_accum": accum, "lr": 1e-3, "ema_decay": 0.5}
    return {
        "run": {"out_dir": str(out_dir), "progress": False, "checkpoint_every": every, "log_every": 1},
        "model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 16, "text_len": 4,
                  "freq_dim": 32},
        "world": {"frames": 6},
        "teacher": {"steps": 3, **opt},
        "ode_pairs": {"count": 4, "batch_size": 2, "substeps": 1},
        "ode_init": {"steps": 2, **opt},
        "dmd": {"steps": 4, "critic_ratio": 2, "lr_critic": 1e-3, **opt},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out, nproc, *, stages=ALL, offload=False, stop_after=None, every=100):
    """Run ``stages`` in ``nproc`` processes (global batch 2: grad_accum = 2 / nproc), started the way torchrun
    starts them (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), without its agent process."""
    script = out.parent / "worker.py"
    script.write_text(WORKER)
    args = json.dumps({"config": config(out, 2 // nproc, every), "stages": stages, "offload": offload,
                       "stop_after": stop_after})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if nproc > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc))
    procs = [subprocess.Popen([sys.executable, str(script), args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**env, **({"RANK": str(r), "LOCAL_RANK": str(r)} if nproc > 1 else {})})
             for r in range(nproc)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The uninterrupted reference: two processes under FSDP2."""
    return launch(tmp_path_factory.mktemp("two") / "run", 2)


def parts_of(out, stage):
    return read_full_checkpoint(str(out / stage))


def assert_same(a, b, stage, part, exact=True):
    pa, pb = a["parts"][part], b["parts"][part]
    assert a["step"] == b["step"]
    pairs = [(pa["model"], pb["model"])] + ([(pa["ema"]["shadow"], pb["ema"]["shadow"])] if pa["ema"] else [])
    pairs += [({k: v["exp_avg"] for k, v in pa["optimizer"]["state"].items()},
               {k: v["exp_avg"] for k, v in pb["optimizer"]["state"].items()})]
    for wa, wb in pairs:
        assert wa.keys() == wb.keys() and len(wa) > 10
        if exact:
            for k in wa:
                assert torch.equal(wa[k], wb[k]), (stage, part, k)
        else:
            d = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
            assert float(d.max()) < 2e-4 and float(d.mean()) < 2e-6, (stage, part, float(d.max()), float(d.mean()))


def logged(out, stage):
    return read_jsonl(str(out / stage / "log.jsonl"))


def test_two_processes_match_one_process_with_accumulation(two, tmp_path):
    one = launch(tmp_path / "one", 1, offload=True)   # FSDP2 on a 1-process group, optimiser on the CPU
    plain = launch(tmp_path / "plain", 1)              # no process group
    for stage, part in PARTS:
        assert_same(parts_of(one, stage), parts_of(two, stage), stage, part, exact=True)
        assert_same(parts_of(plain, stage), parts_of(two, stage), stage, part, exact=False)
    for stage in ("teacher", "ode_init", "dmd"):
        ref = logged(two, stage)
        assert [r["step"] for r in ref] == list(range(1, len(ref) + 1))
        for lp, lt in zip(logged(plain, stage), ref):
            for k, v in lt.items():
                if k.endswith("loss") or k.endswith("grad_norm"):
                    assert lp[k] == pytest.approx(v, rel=1e-5, abs=1e-9), (stage, k)
    # the checkpoint really is sharded: each process wrote half of every block weight
    from self_forcing.training.sharded_checkpoint import read_dcp_metadata

    md = read_dcp_metadata(read_full_checkpoint(str(two / "dmd"))["path"])
    chunks = md.state_dict_metadata["generator/model/blocks.0.ffn.0.weight"].chunks
    assert sorted(c.offsets[0] for c in chunks) == [0, 32] and all(c.sizes[0] == 32 for c in chunks)
    # the pairs were generated in two shards and read back in the same order
    a = torch.load(one / "ode_pairs" / "rank0.pt", weights_only=True)
    b = [torch.load(two / "ode_pairs" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    merged = torch.cat([x["trajectories"] for x in b])[torch.argsort(torch.cat([x["indices"] for x in b]))]
    assert torch.allclose(a["trajectories"].float(), merged.float(), atol=2e-3)
    # the export gathered the EMA weights of the sharded generator, and DMD moved it away from its start
    from self_forcing.sf_model.checkpoint import load_model

    start = load_model(str(two / "ode_init.safetensors")).model.state_dict()
    exported = load_model(str(two / "self_forcing.safetensors")).model.state_dict()
    ema = parts_of(two, "dmd")["parts"]["generator"]["ema"]["shadow"]
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert max(float((exported[k] - start[k]).abs().max()) for k in start) > 1e-4


def copy_inputs(src, dst):
    """The stage outputs DMD starts from (teacher and ODE-init exports)."""
    dst.mkdir(parents=True)
    for name in ("teacher.safetensors", "ode_init.safetensors"):
        shutil.copy(src / name, dst / name)


def test_kill_and_resume_under_fsdp_gives_the_same_weights(two, tmp_path):
    cut = tmp_path / "cut"
    copy_inputs(two, cut)
    launch(cut, 2, stages=["dmd"], stop_after=3, every=2)  # killed after step 3: resumes from step 2
    assert read_full_checkpoint(str(cut / "dmd"))["step"] == 2
    assert not (cut / "self_forcing.safetensors").exists()
    launch(cut, 2, stages=["dmd"], every=2)
    for part in ("generator", "critic"):
        assert_same(parts_of(cut, "dmd"), parts_of(two, "dmd"), "dmd", part, exact=True)
    assert [r["step"] for r in logged(cut, "dmd")] == [1, 2, 3, 4]
    assert (cut / "self_forcing.safetensors").exists()


def test_resume_on_another_number_of_processes(two, tmp_path):
    """Saved on 2 processes, resumed on 1 (and killed again), resumed on 2: the uninterrupted weights."""
    cut = tmp_path / "cut"
    copy_inputs(two, cut)
    for nproc, kill, step in ((2, 2, 1), (1, 2, 2), (2, None, 4)):
        launch(cut, nproc, stages=["dmd"], stop_after=kill, every=1, offload=nproc == 1)
        state = read_full_checkpoint(str(cut / "dmd"))
        meta = torch.load(os.path.join(state["path"], "meta.pt"), weights_only=True)
        assert (meta["step"], meta["world_size"]) == (step, nproc)
    for part in ("generator", "critic"):  # the 1-process run is FSDP2 too: the same sums, bit for bit
        assert_same(parts_of(cut, "dmd"), parts_of(two, "dmd"), "dmd", part, exact=True)
    assert [r["step"] for r in logged(cut, "dmd")] == [1, 2, 3, 4]


POLICY_WORKER = textwrap.dedent('''
    import copy, os
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from self_forcing.sf_model.cache import KVCache
    from self_forcing.sf_model.config import WanConfig
    from self_forcing.training.distributed import init_group
    from self_forcing.training.engine import Runtime, Trainable, full_state_dict, shard_frozen, shutdown
    from self_forcing.training.models import build_model

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cpu = torch.device("cpu")
    init_group(cpu, world, rank)
    # bf16 as on a GPU (init_runtime keeps CPUs in fp32): FSDP2 MixedPrecisionPolicy, master weights fp32
    rt = Runtime(cpu, "bf16", rank, world, rank, parallel="fsdp", optimizer_offload=True, group=True)
    cfg = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, text_len=4, freq_dim=32)
    model = build_model(cfg, 0, cpu)
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 4, 16, generator=g)
    t, target = torch.full((2, 3), 500.0), torch.randn(2, 16, 3, 4, 4, generator=g)

    # the frozen real score, sharded in its own dtype: the same outputs as the whole model
    real = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
    whole = copy.deepcopy(real)
    shard_frozen(real, rt)
    assert isinstance(real.blocks[0].ffn[0].weight, DTensor)
    with torch.no_grad():
        assert torch.equal(real(x, t, ctx), whole(x, t, ctx))
        text = real.encode_text(ctx)  # text K/V through the blocks' FSDP hooks, gathered weights
        assert torch.equal(text[1][0], whole.encode_text(ctx)[1][0])

    tr = Trainable("m", model, rt, lr=1e-3, ema_decay=0.9)
    assert tr.mixed
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(m.ffn[0].weight.dtype))
    out = tr.wrapped(x, t, ctx)
    loss = F.mse_loss(out, target)
    loss.backward()
    ref = F.mse_loss(plain(x, t, ctx), target)
    assert seen == [torch.bfloat16], seen                      # computed with bf16 weights
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item(), (loss.item(), ref.item())
    w = model.blocks[0].ffn[0].weight
    assert isinstance(w, DTensor) and w.dtype == torch.float32 and w.grad.dtype == torch.float32
    tr.step()
    state = tr.optimizer.state[w]
    assert state["exp_avg"].dtype == torch.float32 and w.to_local().shape[0] == 64 // world
    assert all(s.dtype == torch.float32 for s in tr.ema.shadow.values())
    # a rollout step through the registered forward_chunk, KV cache in bf16
    cache = KVCache(2, 2, 4, 2, 16, window=3, dtype=torch.bfloat16, device=cpu)
    with torch.no_grad():
        y = tr.wrapped.forward_chunk(x, t, tr.wrapped.encode_text(ctx), cache, 0)
    assert y.shape == x.shape and cache.k.abs().sum() > 0
    full = full_state_dict(tr, ema=True)
    ema_w = tr.ema.shadow["blocks.0.ffn.0.weight"].full_tensor()
    live_w = w.full_tensor()
    if rank == 0:
        assert full.keys() == plain.state_dict().keys() and all(v.dtype == torch.float32 for v in full.values())
        assert torch.equal(full["blocks.0.ffn.0.weight"], ema_w) and not torch.equal(ema_w, live_w)
    else:
        assert full == {}

    # activation checkpointing under FSDP2: a rollout's gradients (recomputed blocks, text path included) are
    # those of the plain model (both processes draw the same batch, so the average is the batch's gradient)
    from self_forcing.sf_model.schedule import make_steps
    from self_forcing.training.config import SamplingConfig
    from self_forcing.training.distributed import full_tensor
    from self_forcing.training.dmd import rollout

    rt32 = Runtime(cpu, "fp32", rank, world, rank, parallel="fsdp", group=True)
    base = build_model(cfg, 0, cpu)
    with torch.no_grad():
        for p in base.head.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    steps, opts = make_steps((1000, 750, 500, 250), 5.0, True), SamplingConfig().stream_options()

    def noise_for(b, n, k):
        return [torch.randn(2, 16, n, 4, 4, generator=torch.Generator().manual_seed(100 * b + s)) for s in range(k)]

    def grads(model):
        text = model.encode_text(ctx)
        video = rollout(model, text, batch=2, clip_shape=(16, 6, 4, 4), steps=steps, opts=opts, exit_index=1,
                        noise_for=noise_for, grad=True, cache_dtype=torch.float32)
        video.pow(2).mean().backward()
        return {n: full_tensor(p.grad) for n, p in model.named_parameters()}

    ref = grads(copy.deepcopy(base))
    ac = copy.deepcopy(base).set_activation_checkpointing(True)
    got = grads(Trainable("ac", ac, rt32, lr=1e-3).wrapped)
    assert ref.keys() == got.keys() and float(ref["blocks.0.cross_attn.k.weight"].abs().max()) > 0
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-8), (n, float((got[n] - ref[n]).abs().max()))
    shutdown(rt)
    print("policies ok", flush=True)
''')


def test_fsdp_policies_mixed_precision_offload_real_score_and_recompute(tmp_path):
    """What a GPU run configures, on CPUs: bf16 compute with float32 master weights, gradients, AdamW state
    and EMA; CPU-offloaded blocks; the frozen real score sharded in bf16 with the same outputs; activation
    checkpointing of the sharded generator with the same rollout gradients as the plain model."""
    script = tmp_path / "policy.py"
    script.write_text(POLICY_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outputs):
        assert p.returncode == 0 and "policies ok" in text, text[-4000:]
