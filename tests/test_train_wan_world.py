"""The Wan path of the trainer at tiny size: data-free, prompts from a prompt store (or the nodes' 'Save Text
Embeddings' files) read lazily and shuffled per epoch and stream, Wan's negative prompt as the unconditional
context, the teacher from a given checkpoint, ODE pairs -> ODE init -> DMD."""

import hashlib

import pytest
import torch

from self_forcing.sf_model.checkpoint import load_model, save_model
from self_forcing.sf_model.text_embeds import save_text_embeds
from self_forcing.training.config import load_config
from self_forcing.training.data import PromptOrder, WanWorld
from self_forcing.training.engine import Runtime
from self_forcing.training.models import build_model
from self_forcing.training.prompt_store import NEGATIVE_PROMPT, StoreError, encode_store
from self_forcing.training.stages import run_stages

MODEL = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 24, "text_len": 6,
         "freq_dim": 32}
PROMPTS = [f"prompt {i} " + "word " * (i % 9) for i in range(10)]  # 2 to 10 tokens


def fake_encoder(texts):
    out = []
    for t in texts:
        g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16))
        out.append(torch.randn(len(t.split()), 24, generator=g))
    return out


fake_encoder.name = "fake-24"


def config(tmp_path, seed=0, **world):
    teacher = tmp_path / "wan_teacher.safetensors"
    if not teacher.exists():
        save_model(str(teacher), build_model(load_config(data={"model": MODEL}).model, 3, torch.device("cpu")),
                   load_config(data={"model": MODEL}).model)
    return load_config(data={
        "run": {"out_dir": str(tmp_path / "run"), "progress": False, "log_every": 1, "seed": seed},
        "model": MODEL,
        "models": {"real_score": str(teacher)},
        "world": {"kind": "wan", "frames": 6, "latent_height": 4, "latent_width": 4, **world},
        "ode_pairs": {"count": 3, "batch_size": 3, "substeps": 1},
        "ode_init": {"steps": 2, "batch_size": 2},
        "dmd": {"steps": 2, "batch_size": 1, "critic_ratio": 1},
    })


@pytest.fixture
def store(tmp_path):
    return encode_store(PROMPTS, str(tmp_path / "store"), fake_encoder, shard_size=4, progress=False)


def test_wan_world_reads_the_store_a_batch_at_a_time(tmp_path, store):
    world = WanWorld(config(tmp_path, prompt_store=store.path))
    assert len(world) == 10 and world.clip_shape == (16, 6, 4, 4)
    ids = world.prompt_ids([0, 1, 2], "dmd")
    ctx = world.contexts([0, 1, 2], "cpu", "dmd")
    assert ctx.shape == (3, 6, 24) and ctx.dtype == torch.float32
    for b, i in enumerate(ids):
        row = store.embedding(i).float()
        n = min(row.shape[0], 6)
        assert torch.equal(ctx[b, :n], row[:n])  # the prompt's tokens, truncated at text_len
        assert torch.count_nonzero(ctx[b, n:]) == 0  # then zero padding
    # only these prompts (and, once, the negative prompt) were read from disk
    assert world.source.bytes_read == (sum(store.tokens(i) for i in ids) + store.manifest["negative"]["tokens"]) * 48
    neg = store.negative().float()
    assert store.negative_text == NEGATIVE_PROMPT
    uncond = world.uncond(2, "cpu")
    assert uncond.shape == (2, 6, 24) and torch.equal(uncond[1, :neg.shape[0]], neg[:6])
    with pytest.raises(ValueError, match="data-free"):
        world.clips([0], "cpu", "teacher")


def test_prompt_order_is_shuffled_per_epoch_seed_and_stream(tmp_path, store):
    world = WanWorld(config(tmp_path, prompt_store=store.path))
    epoch0 = world.prompt_ids(range(10), "dmd")
    epoch1 = world.prompt_ids(range(10, 20), "dmd")
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))  # each epoch reads every prompt once
    assert epoch0 != epoch1 and epoch0 != list(range(10))
    assert world.prompt_ids(range(10), "dmd-critic") != epoch0  # the critic's batches are not the generator's
    again = WanWorld(config(tmp_path, prompt_store=store.path))
    assert again.prompt_ids(range(20), "dmd") == epoch0 + epoch1  # same seed, same order (every rank agrees)
    other = WanWorld(config(tmp_path, seed=1, prompt_store=store.path))
    assert other.prompt_ids(range(10), "dmd") != epoch0
    ctx = world.contexts([3, 13], "cpu", "dmd")
    assert torch.equal(ctx[0], world.contexts([3], "cpu", "dmd")[0])  # a sample is a pure function of its index
    order = PromptOrder(7, seed=5, shuffle=False)
    assert order([0, 6, 7, 15], "dmd") == [0, 6, 0, 1]


def test_generator_and_critic_steps_draw_separate_prompt_batches(tmp_path, store):
    cfg = config(tmp_path, prompt_store=store.path)
    world = WanWorld(cfg)
    seen = []
    contexts = world.contexts

    def spy(indices, device, stream):
        seen.append((stream, tuple(world.prompt_ids(indices, stream))))
        return contexts(indices, device, stream)

    world.contexts = spy
    out = run_stages(cfg, ["teacher", "ode_pairs", "ode_init", "dmd"], Runtime(device=torch.device("cpu")), world)
    assert out["teacher"] == cfg.models.real_score
    student = load_model(out["dmd"])
    assert student.meta["role"] == "self_forcing" and student.meta["frames_per_block"] == 3
    gen = [ids for stream, ids in seen if stream == "dmd"]
    critic = [ids for stream, ids in seen if stream == "dmd-critic"]
    assert len(gen) == 2 and len(critic) == 2  # critic_ratio 1: both update every step
    assert gen != critic
    with pytest.raises(ValueError, match="toy world"):
        run_stages(cfg, ["eval"], Runtime(device=torch.device("cpu")), world)


def test_wan_world_from_saved_embeddings_and_a_negative_file(tmp_path):
    prompts = tmp_path / "embeds"
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 4, 24, generator=g)
    b = torch.randn(2, 9, 24, generator=g)
    save_text_embeds(str(prompts / "a_00001.safetensors"), a)
    save_text_embeds(str(prompts / "sub" / "b_00001.safetensors"), b)  # 2 prompts
    negative = tmp_path / "negative.safetensors"
    neg = torch.randn(1, 3, 24, generator=g)
    save_text_embeds(str(negative), neg)
    world = WanWorld(config(tmp_path, prompts_dir=str(prompts), negative=str(negative)))
    rows = [a[0], b[0], b[1]]
    assert len(world) == 3
    ids = world.prompt_ids([0, 1, 2], "dmd")
    ctx = world.contexts([0, 1, 2], "cpu", "dmd")
    for k, i in enumerate(ids):
        assert torch.equal(ctx[k], torch.nn.functional.pad(rows[i], (0, 0, 0, 6 - rows[i].shape[0]))[:6])
    unc = world.uncond(1, "cpu")
    assert torch.equal(unc[0, :3], neg[0]) and torch.count_nonzero(unc[0, 3:]) == 0
    assert torch.count_nonzero(WanWorld(config(tmp_path, prompts_dir=str(prompts))).uncond(1, "cpu")) == 0


def test_wan_world_errors(tmp_path, store):
    with pytest.raises(ValueError, match="needs prompts: set world.prompt_store"):
        WanWorld(config(tmp_path))
    with pytest.raises(ValueError, match="not both"):
        WanWorld(config(tmp_path, prompt_store=store.path, prompts_dir=str(tmp_path)))
    with pytest.raises(StoreError, match="not a prompt store"):
        WanWorld(config(tmp_path, prompt_store=str(tmp_path / "nope")))
    wide = encode_store(["a b"], str(tmp_path / "wide"), lambda t: [torch.zeros(2, 32)], negative=None,
                        progress=False)
    with pytest.raises(ValueError, match="width 32, the model expects 24"):
        WanWorld(config(tmp_path, prompt_store=wide.path))
    with pytest.raises(ValueError, match="Save Text Embeddings"):
        WanWorld(config(tmp_path, prompts_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text embeddings"):
        WanWorld(config(tmp_path, prompts_dir=str(tmp_path / "empty")))
