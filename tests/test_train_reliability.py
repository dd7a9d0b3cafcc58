"""Trainer reliability: safe checkpoint loading, logs after kills, corrupt checkpoints."""

import os

import torch

from self_forcing.training.engine import Runtime, Trainable, generator, read_jsonl, run_loop

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
