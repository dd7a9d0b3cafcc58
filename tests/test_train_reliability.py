"""Trainer reliability: safe checkpoint loading, logs after kills, corrupt checkpoints."""

import os
import warnings

import pytest
import torch

from self_forcing.training.config import load_config
from self_forcing.training.engine import Checkpointer, Runtime, Trainable, generator, read_jsonl, run_loop
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


# -- 1. loading a checkpoint never runs code --------------------------------------------------------
class Payload:
    """Unpickling this creates ``marker`` (stands in for ``os.system``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_malicious_checkpoint(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run_dir.mkdir()
    torch.save({"step": 1, "parts": {"net": Payload(marker)}, "extra": {}}, str(run_dir / "checkpoint.pt"))
    try:
        run(run_dir)
        error = None
    except Exception as e:  # noqa: BLE001 - checked below, after the marker
        error = e
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert isinstance(error, ValueError) and "checkpoint.pt" in str(error), error


def test_checkpoints_load_with_weights_only_and_resume_exactly(tmp_path):
    _, full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=3)
    state = torch.load(str(tmp_path / "cut" / "checkpoint.pt"), map_location="cpu", weights_only=True)
    assert state["step"] == 2 and set(state["parts"]["net"]) == {"model", "optimizer", "scheduler", "updates", "ema"}
    end, cut = run(tmp_path / "cut")
    assert end.completed and end.steps == TOTAL
    assert same_weights(final_weights(full), final_weights(cut))
    assert logged_steps(tmp_path / "cut") == list(range(1, TOTAL + 1))


# -- 2. the log after a kill before the first checkpoint -------------------------------------------------
def test_log_has_each_step_once_after_kills_before_the_first_checkpoint(tmp_path):
    run(tmp_path, stop_after=3, every=100)
    run(tmp_path, stop_after=3, every=100)
    assert not os.path.exists(tmp_path / "checkpoint.pt")
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
    read = lambda name: torch.load(str(tmp_path / name), map_location="cpu", weights_only=True)["step"]
    assert (read("checkpoint.pt"), read("checkpoint.prev.pt")) == (3, 2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt", "log.jsonl"]


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


def random_bytes(path):
    with open(path, "wb") as fh:
        fh.write(os.urandom(4096))


@pytest.mark.parametrize("damage", [truncate, random_bytes])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    _, full = run(tmp_path / "full")
    cut = tmp_path / "cut"
    run(cut, stop_after=4)  # newest: step 3, previous: step 2
    damage(str(cut / "checkpoint.pt"))
    with pytest.warns(UserWarning, match="checkpoint.pt.*checkpoint.prev.pt"):
        end, parts = run(cut)
    assert end.completed and end.steps == TOTAL
    assert same_weights(final_weights(full), final_weights(parts))
    assert logged_steps(cut) == list(range(1, TOTAL + 1))  # trimmed to step 2, then 3.. logged once
    # the good previous checkpoint was not replaced by the damaged one on the next save
    assert torch.load(str(cut / "checkpoint.prev.pt"), weights_only=True)["step"] == TOTAL - 1


def test_a_kill_between_the_two_renames_still_resumes(tmp_path):
    run(tmp_path, stop_after=4)
    os.replace(tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt")  # newest moved away, new not yet in
    parts = make_parts()
    ckpt = Checkpointer(str(tmp_path), CPU)
    assert ckpt.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing newest file is an expected state, not a damaged one
        step, _ = ckpt.load(parts)
    assert step == 3


@pytest.mark.parametrize("damage", [truncate, random_bytes])
def test_no_readable_checkpoint_names_the_files_to_delete(tmp_path, damage):
    run(tmp_path, stop_after=4)
    damage(str(tmp_path / "checkpoint.pt"))
    damage(str(tmp_path / "checkpoint.prev.pt"))
    with pytest.raises(ValueError, match="(?i)delete") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(tmp_path)
    assert str(tmp_path / "checkpoint.pt") in str(info.value)
    assert str(tmp_path / "checkpoint.prev.pt") in str(info.value)


def test_only_a_corrupt_checkpoint_without_a_previous_one_raises_a_value_error(tmp_path):
    run(tmp_path, stop_after=2, every=1)  # one checkpoint (after step 1), no previous one
    truncate(str(tmp_path / "checkpoint.pt"))
    with pytest.raises(ValueError, match=r"(?i)checkpoint\.pt.*delete"):
        run(tmp_path)
