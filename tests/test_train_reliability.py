"""Trainer reliability: safe checkpoint loading, logs after kills, corrupt checkpoints (the sharded DCP format
of ``training.sharded_checkpoint``, written by one process here; tests/test_train_distributed.py covers several)."""

import os
import pickle
import shutil
import warnings

import pytest
import torch

from self_forcing.training.config import load_config
from self_forcing.training.engine import (Checkpointer, Runtime, Trainable, generator, read_full_checkpoint,
                                          read_jsonl, run_loop)
from self_forcing.training.data import RandomWorld as World
from self_forcing.training.stages import run_stages

CPU = Runtime(device=torch.device("cpu"))
TOTAL = 5


def make_parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return {"net": Trainable("net", model, CPU, lr=1e-2, warmup=2, ema_decay=0.9)}


def step_fn_for(parts):
    tr = parts["net"]

    def step_fn(step: int) -> dict:
        x = torch.randn(8, 4, generator=generator("rel", step))
        loss = tr.model(x).pow(2).mean()
        loss.backward()
        return {"loss": loss.item(), "grad_norm": tr.step()}
    return step_fn


def run(directory, stop_after=None, every=1, parts=None):
    parts = parts or make_parts()
    end = run_loop("rel", TOTAL, step_fn_for(parts), parts, str(directory), CPU, log_every=1,
                   checkpoint_every=every, progress=False, stop_after=stop_after)
    return end, parts


def logged_steps(directory):
    return [r["step"] for r in read_jsonl(os.path.join(directory, "log.jsonl"))]


def final_weights(parts):
    return {k: v.detach().clone() for k, v in parts["net"].model.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ckdir(directory):
    return os.path.join(directory, "checkpoint")


def step_dir(directory, step):
    return os.path.join(ckdir(directory), f"step_{step:09d}")


def pointer(directory):
    with open(os.path.join(ckdir(directory), "latest")) as fh:
        return fh.read().strip()


# -- 1. loading a checkpoint never runs code --------------------------------------------------------
class Payload:
    """Unpickling this creates ``marker`` (stands in for ``os.system``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def resume_error(run_dir):
    try:
        run(run_dir)
    except Exception as e:  # noqa: BLE001 - checked by the callers, after the marker
        return e
    return None


def test_resume_refuses_a_malicious_checkpoint(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run(run_dir, stop_after=2)
    torch.save({"format": "self_forcing.trainer/2", "step": 1, "parts": {"net": Payload(marker)}, "extra": {}},
               os.path.join(step_dir(run_dir, 1), "meta.pt"))
    error = resume_error(run_dir)
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert isinstance(error, ValueError) and "meta.pt" in str(error), error


def test_resume_refuses_malicious_dcp_metadata(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run(run_dir, stop_after=2)
    with open(os.path.join(step_dir(run_dir, 1), ".metadata"), "wb") as fh:
        pickle.dump(Payload(marker), fh)
    error = resume_error(run_dir)
    assert not marker.exists(), "unpickling the DCP metadata ran code"
    assert isinstance(error, ValueError) and ".metadata" in str(error) and "delete" in str(error).lower(), error


def test_resume_refuses_pickled_entries_in_the_dcp_files(tmp_path):
    """A checkpoint whose metadata declares an entry as pickled bytes: DCP would torch.load it with
    weights_only=False; the trainer's planner refuses it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    run_dir = tmp_path / "run"
    run(run_dir, stop_after=2)
    path = os.path.join(step_dir(run_dir, 1), ".metadata")
    with open(path, "rb") as fh:
        md = pickle.load(fh)
    md.state_dict_metadata["net/model/weight"] = BytesStorageMetadata()
    with open(path, "wb") as fh:
        pickle.dump(md, fh)
    error = resume_error(run_dir)
    assert isinstance(error, ValueError) and "pickle" in str(error).lower(), error


def test_checkpoints_load_with_weights_only_and_resume_exactly(tmp_path):
    _, full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=3)
    meta = torch.load(os.path.join(step_dir(tmp_path / "cut", 2), "meta.pt"), map_location="cpu", weights_only=True)
    assert meta["step"] == 2 and set(meta["parts"]["net"]) >= {"scheduler", "updates", "param_groups", "ema"}
    state = read_full_checkpoint(str(tmp_path / "cut"))
    assert state["step"] == 2 and set(state["parts"]["net"]["model"]) == {"weight", "bias"}
    assert set(state["parts"]["net"]["ema"]["shadow"]) == {"weight", "bias"}
    end, cut = run(tmp_path / "cut")
    assert end.completed and end.steps == TOTAL
    assert same_weights(final_weights(full), final_weights(cut))
    assert torch.equal(full["net"].ema.shadow["weight"], cut["net"].ema.shadow["weight"])
    assert logged_steps(tmp_path / "cut") == list(range(1, TOTAL + 1))


def test_trainable_optimises_only_what_requires_grad_and_leaves_the_flags(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    tr = Trainable("net", model, CPU, lr=1e-1, ema_decay=0.5)
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    assert {id(p) for g in tr.optimizer.param_groups for p in g["params"]} == {id(p) for p in model[1].parameters()}
    assert set(tr.ema.shadow) == {"1.weight", "1.bias"}
    model(torch.randn(2, 4)).sum().backward()
    tr.step()
    assert torch.equal(model[0].weight, frozen)
    Checkpointer(str(tmp_path), CPU).save(1, {"net": tr})
    stored = read_full_checkpoint(str(tmp_path))["parts"]["net"]["model"]
    assert set(stored) == {"1.weight", "1.bias"}  # frozen weights come back from the model's own file
    with pytest.raises(ValueError, match="no parameter requires gradient"):
        Trainable("none", torch.nn.Linear(2, 2).requires_grad_(False), CPU, lr=1e-3)


# -- 2. the log after a kill before the first checkpoint -------------------------------------------------
def test_log_has_each_step_once_after_kills_before_the_first_checkpoint(tmp_path):
    run(tmp_path, stop_after=3, every=100)
    run(tmp_path, stop_after=3, every=100)
    assert not os.path.exists(ckdir(tmp_path))
    end, _ = run(tmp_path, every=100)
    assert end.completed
    assert logged_steps(tmp_path) == list(range(1, TOTAL + 1))


def test_stage_log_has_each_step_once_after_two_early_kills(tmp_path):
    cfg = load_config(data={
        "run": {"out_dir": str(tmp_path), "progress": False, "checkpoint_every": 100, "log_every": 1},
        "model": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 16, "text_len": 4,
                  "freq_dim": 32},
        "world": {"frames": 6},
        "teacher": {"steps": 4, "batch_size": 2, "lr": 1e-3},
    })
    run_stages(cfg, ["teacher"], CPU, World(), stop_after=2)
    run_stages(cfg, ["teacher"], CPU, World(), stop_after=2)
    run_stages(cfg, ["teacher"], CPU, World())
    assert logged_steps(tmp_path / "teacher") == [1, 2, 3, 4]


# -- 3. corrupt checkpoints -------------------------------------------------------------------------------
def test_saving_keeps_the_previous_checkpoint(tmp_path):
    run(tmp_path, stop_after=4)  # checkpoints after steps 1, 2 and 3
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "log.jsonl"]
    assert sorted(os.listdir(ckdir(tmp_path))) == ["latest", "step_000000002", "step_000000003"]
    assert pointer(tmp_path) == "step_000000003"
    assert read_full_checkpoint(str(tmp_path))["step"] == 3


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


def random_bytes(path):
    with open(path, "wb") as fh:
        fh.write(os.urandom(4096))


DAMAGE = [(truncate, "__0_0.distcp"), (random_bytes, "__0_0.distcp"), (truncate, ".metadata"),
          (random_bytes, "meta.pt")]


@pytest.mark.parametrize("damage,name", DAMAGE)
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, name):
    _, full = run(tmp_path / "full")
    cut = tmp_path / "cut"
    run(cut, stop_after=4)  # newest: step 3, previous: step 2
    damage(os.path.join(step_dir(cut, 3), name))
    with pytest.warns(UserWarning, match="step_000000003.*step_000000002"):
        end, parts = run(cut)
    assert end.completed and end.steps == TOTAL
    assert same_weights(final_weights(full), final_weights(parts))
    assert logged_steps(cut) == list(range(1, TOTAL + 1))  # trimmed to step 2, then 3.. logged once
    # the damaged checkpoint was rewritten, and the good one kept, as the run went on
    assert sorted(os.listdir(ckdir(cut))) == ["latest", f"step_{TOTAL - 1:09d}", f"step_{TOTAL:09d}"]
    assert read_full_checkpoint(str(cut))["step"] == TOTAL


def test_a_kill_inside_a_save_still_resumes_from_the_committed_checkpoint(tmp_path):
    run(tmp_path, stop_after=4)
    # a save of step 4 killed after DCP wrote its files and meta.pt, before the pointer moved
    shutil.copytree(step_dir(tmp_path, 3), step_dir(tmp_path, 4))
    # and one killed before meta.pt: no meta.pt
    shutil.copytree(step_dir(tmp_path, 3), step_dir(tmp_path, 5))
    os.remove(os.path.join(step_dir(tmp_path, 5), "meta.pt"))
    parts = make_parts()
    ckpt = Checkpointer(str(tmp_path), CPU)
    assert ckpt.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # uncommitted folders are an expected state, not damage
        step, _ = ckpt.load(parts)
    assert step == 3
    assert not os.path.exists(step_dir(tmp_path, 5))  # the incomplete one is gone


def test_a_missing_pointer_resumes_from_the_newest_complete_folder(tmp_path):
    run(tmp_path, stop_after=4)
    os.remove(os.path.join(ckdir(tmp_path), "latest"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step, _ = Checkpointer(str(tmp_path), CPU).load(make_parts())
    assert step == 3


@pytest.mark.parametrize("damage", [truncate, random_bytes])
def test_no_readable_checkpoint_names_the_folder_to_delete(tmp_path, damage):
    run(tmp_path, stop_after=4)
    for step in (2, 3):
        damage(os.path.join(step_dir(tmp_path, step), "__0_0.distcp"))
    with pytest.raises(ValueError, match="(?i)delete") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(tmp_path)
    assert ckdir(tmp_path) in str(info.value)
    assert "step_000000003" in str(info.value) and "step_000000002" in str(info.value)


def test_only_a_corrupt_checkpoint_without_a_previous_one_raises_a_value_error(tmp_path):
    run(tmp_path, stop_after=2, every=1)  # one checkpoint (after step 1), no previous one
    truncate(os.path.join(step_dir(tmp_path, 1), "__0_0.distcp"))
    with pytest.raises(ValueError, match=r"(?i)step_000000001.*delete"):
        run(tmp_path)
