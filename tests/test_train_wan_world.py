"""The Wan path of the trainer at tiny size: data-free, prompts from saved text embeddings (the nodes'
'Save Text Embeddings' files), the teacher from a given checkpoint, ODE pairs -> ODE init -> DMD."""

import pytest
import torch

from self_forcing.sf_model.text_embeds import save_text_embeds
from self_forcing.sf_model.checkpoint import load_model, save_model
from self_forcing.training.config import load_config
from self_forcing.training.engine import Runtime
from self_forcing.training.models import build_model
from self_forcing.training.stages import run_stages
from self_forcing.training.data import WanWorld


def setup_files(tmp_path):
    model_cfg = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 24, "text_len": 6,
                 "freq_dim": 32}
    cfg = load_config(data={"model": model_cfg})
    teacher = tmp_path / "wan_teacher.safetensors"
    save_model(str(teacher), build_model(cfg.model, 3, torch.device("cpu")), cfg.model)
    prompts = tmp_path / "embeds"
    g = torch.Generator().manual_seed(0)
    save_text_embeds(str(prompts / "a_00001.safetensors"), torch.randn(1, 4, 24, generator=g))
    save_text_embeds(str(prompts / "sub" / "b_00001.safetensors"), torch.randn(2, 9, 24, generator=g))  # 2 prompts
    negative = tmp_path / "negative.safetensors"
    save_text_embeds(str(negative), torch.randn(1, 3, 24, generator=g))
    return load_config(data={
        "run": {"out_dir": str(tmp_path / "run"), "progress": False, "log_every": 1},
        "model": model_cfg,
        "world": {"kind": "wan", "frames": 6, "latent_height": 4, "latent_width": 4, "prompts_dir": str(prompts),
                  "negative": str(negative), "teacher_path": str(teacher)},
        "ode_pairs": {"count": 3, "batch_size": 3, "substeps": 1},
        "ode_init": {"steps": 2, "batch_size": 2},
        "dmd": {"steps": 2, "batch_size": 1, "critic_ratio": 1},
    })


def test_wan_world_reads_saved_embeddings(tmp_path):
    cfg = setup_files(tmp_path)
    world = WanWorld(cfg)
    assert len(world.rows) == 3 and world.clip_shape == (16, 6, 4, 4)
    ctx = world.contexts([0, 1, 2, 3], "cpu", "dmd")
    assert ctx.shape == (4, 6, 24)
    assert torch.equal(ctx[0], ctx[3])  # indices wrap around the prompt list
    assert torch.count_nonzero(ctx[0, 4:]) == 0  # 4 tokens, zero padded to text_len 6
    assert world.uncond(2, "cpu").shape == (2, 6, 24)
    with pytest.raises(ValueError, match="data-free"):
        world.clips([0], "cpu", "teacher")


def test_wan_pipeline_runs_from_a_released_teacher(tmp_path):
    cfg = setup_files(tmp_path)
    world = WanWorld(cfg)
    out = run_stages(cfg, ["teacher", "ode_pairs", "ode_init", "dmd"], Runtime(device=torch.device("cpu")), world)
    assert out["teacher"] == cfg.world.teacher_path
    student = load_model(out["dmd"])
    assert student.meta["role"] == "self_forcing" and student.meta["frames_per_block"] == 3
    with pytest.raises(ValueError, match="toy world"):
        run_stages(cfg, ["eval"], Runtime(device=torch.device("cpu")), world)


def test_wan_world_errors(tmp_path):
    cfg = load_config(data={"world": {"kind": "wan", "frames": 21, "prompts_dir": str(tmp_path / "nope")}})
    with pytest.raises(ValueError, match="Save Text Embeddings"):
        WanWorld(cfg)
    (tmp_path / "empty").mkdir()
    cfg = load_config(data={"world": {"kind": "wan", "frames": 21, "prompts_dir": str(tmp_path / "empty")}})
    with pytest.raises(ValueError, match="no text embeddings"):
        WanWorld(cfg)
