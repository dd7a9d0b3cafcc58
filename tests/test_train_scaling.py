"""benchmarks/train_scaling_gpu.py (the multi-GPU scaling table and its checks) runs on CPU processes (gloo)."""

import importlib.util
import json
import os
import pathlib

import pytest

PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_scaling_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_scaling_gpu", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scaling_driver_runs_every_count_and_both_checks_on_cpu_processes(bench, tmp_path):
    out = tmp_path / "scaling"
    rc = bench.main(["--device", "cpu", "--tiny", "--gpus", "1,2", "--steps", "6", "--out", str(out)])
    result = json.loads((out / "scaling.json").read_text())
    assert rc == 0 and result["skipped"] == []
    rows = {r["gpus"]: r for r in result["throughput"]}
    assert set(rows) == {1, 2} and all(r["status"] == "ok" and r["all_losses_finite"] for r in rows.values())
    assert rows[1]["efficiency"] == 1.0 and rows[2]["samples_per_s"] > 0
    two = rows[2]
    assert two["efficiency"] == round(two["samples_per_s"] / (2 * rows[1]["samples_per_s"]), 3)
    assert two["samples_per_s"] == round(2 / (two["generator_s"] + 5 * two["critic_s"]), 4)
    (check,) = result["checks"]
    assert check["gpus"] == 2 and check["equivalence_ok"] and check["resume_ok"]
    for row in list(check["equivalence"].values()) + list(check["resume_k_to_1"].values()):
        # CPU processes under FSDP2 sum in the same order: bit-identical, not merely within --tol
        assert row["comparable"] and row["tensors"] > 10 and row["max"] == 0.0
    # the comparison sees a difference where there is one: the critic against the generator of the same run
    root = out / "checks_2gpu"
    other = bench.difference(str(root / "many"), str(root / "many"), "dmd", "generator", part_b="critic")
    assert other["comparable"] and other["max"] > 1e-3
    # the resumed run's last process count was 1
    import torch
    from self_forcing.training.engine import read_full_checkpoint

    state = read_full_checkpoint(str(root / "cut" / "dmd"))
    meta = torch.load(os.path.join(state["path"], "meta.pt"), weights_only=True)
    assert meta["world_size"] == 1 and meta["step"] == 4
    assert "| 2 | wan:fsdp+ac+shardreal |" in bench.markdown(result)


def test_scaling_driver_skips_counts_the_machine_lacks(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "available", lambda device: 1)
    launched = []
    monkeypatch.setattr(bench, "throughput", lambda k, args, out: launched.append(k) or {"rows": []})
    assert bench.main(["--device", "cpu", "--tiny", "--gpus", "1,2,8", "--parts", "throughput",
                       "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert launched == [1] and result["skipped"] == [2, 8]
    with pytest.raises(SystemExit):
        bench.main(["--parts", "speed", "--out", str(tmp_path)])
