"""Attention backend choice: FlashInfer's Hopper kernel only where importable on sm90, SDPA otherwise; the
FlashInfer call gets FlashInfer's NHD layout per batch element."""

import importlib.util
import json
import pathlib
import sys
import types

import pytest
import torch

from self_forcing.sf_model import attention as A


@pytest.fixture
def fresh_modules():
    A._flash_module.cache_clear()
    yield
    A._flash_module.cache_clear()


class FakeFlashInfer(types.ModuleType):
    """Stands in for ``flashinfer``: records each call and computes the attention with SDPA."""

    def __init__(self):
        super().__init__("flashinfer")
        self.calls = []

    def single_prefill_with_kv_cache(self, q, k, v, **kw):
        self.calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), q.is_contiguous(), kw))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                                               v.transpose(0, 1))
        return out.transpose(0, 1)


def hide(monkeypatch, *names):
    for n in names:  # a None entry in sys.modules makes the import raise ImportError
        monkeypatch.setitem(sys.modules, n, None)


def test_auto_is_sdpa_without_flashinfer_or_on_the_cpu(monkeypatch, fresh_modules):
    hide(monkeypatch, "flashinfer", "flash_attn", "flash_attn_interface")
    monkeypatch.setattr(A, "cuda_capability", lambda device: (9, 0))
    assert A.resolve_backend("auto", torch.device("cuda")) == "sdpa"
    with pytest.raises(ValueError, match="not available"):
        A.resolve_backend("flashinfer", torch.device("cuda"))
    monkeypatch.setitem(sys.modules, "flashinfer", FakeFlashInfer())
    A._flash_module.cache_clear()
    assert A.resolve_backend("auto", torch.device("cpu")) == "sdpa"  # importable but no GPU
    assert A.available_backends(torch.device("cpu")) == ["sdpa"]


def test_auto_picks_flashinfer_on_sm90_only(monkeypatch, fresh_modules):
    hide(monkeypatch, "flash_attn", "flash_attn_interface")
    monkeypatch.setitem(sys.modules, "flashinfer", FakeFlashInfer())
    cap = {"v": (9, 0)}
    monkeypatch.setattr(A, "cuda_capability", lambda device: cap["v"])
    assert A.resolve_backend("auto", torch.device("cuda")) == "flashinfer"
    assert A.available_backends(torch.device("cuda:0")) == ["flashinfer", "sdpa"]
    for other in ((8, 0), (10, 0), (12, 0)):  # Ampere, Blackwell: the fa3 kernel is Hopper's
        cap["v"] = other
        assert A.resolve_backend("auto", torch.device("cuda")) == "sdpa"


def test_flash_attn_3_stays_first_where_importable(monkeypatch, fresh_modules):
    monkeypatch.setitem(sys.modules, "flashinfer", FakeFlashInfer())
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.ModuleType("flash_attn_interface"))
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(A, "cuda_capability", lambda device: (9, 0))
    assert A.available_backends(torch.device("cuda")) == ["flash3", "flashinfer", "flash2", "sdpa"]


def test_flashinfer_call_gets_nhd_layouts_and_matches_sdpa(monkeypatch, fresh_modules):
    fake = FakeFlashInfer()
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    g = torch.Generator().manual_seed(0)
    b, lq, lk, h, d = 2, 12, 30, 3, 16
    q = torch.randn(b, lq, h, d, generator=g).bfloat16()
    k = torch.randn(b, lk, h, d, generator=g).bfloat16()
    v = torch.randn(b, lk, h, d, generator=g).bfloat16()
    out = A.attention(q, k, v, "flashinfer")
    assert out.shape == (b, lq, h, d) and out.dtype == torch.bfloat16
    assert len(fake.calls) == b
    for qs, ks, vs, contiguous, kw in fake.calls:
        assert (qs, ks, vs) == ((lq, h, d), (lk, h, d), (lk, h, d)) and contiguous
        assert kw == {"causal": False, "kv_layout": "NHD", "backend": "fa3"}
    ref = A.attention(q, k, v, "sdpa")
    torch.testing.assert_close(out, ref, atol=4e-3, rtol=2e-2)  # bf16: other memory layout, other rounding
    # float32 (the toy model) is not a FlashInfer dtype: SDPA, the kernel is not called
    out32 = A.attention(q.float(), k.float(), v.float(), "flashinfer")
    assert len(fake.calls) == b and out32.dtype == torch.float32


def test_model_streams_through_the_picked_flashinfer_backend(monkeypatch, fresh_modules, make_tiny):
    fake = FakeFlashInfer()
    monkeypatch.setitem(sys.modules, "flashinfer", fake)
    monkeypatch.setattr(A, "cuda_capability", lambda device: (9, 0))
    model = make_tiny(dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 4, 6, generator=g).bfloat16()
    ctx = torch.randn(1, 10, 32, generator=g).bfloat16()
    ref = model.forward(x, 500.0, ctx)
    assert not fake.calls
    monkeypatch.setattr(model, "_backend", ("cpu", "flashinfer"))  # as 'auto' resolves on an sm90 GPU
    out = model.forward(x, 500.0, ctx)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err  # the same model in bf16 (another memory layout, other rounding)
    # every self- and cross-attention of both blocks: q [2 frames * 6 tokens, 4 heads, 16]
    assert len(fake.calls) == 2 * 2 and {c[0] for c in fake.calls} == {(12, 4, 16)}
    assert sorted({c[1] for c in fake.calls}) == [(12, 4, 16), (16, 4, 16)]  # self: 12 keys, cross: 16 text tokens


def load_benchmark(name):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_attention_backends_benchmark_tiny_runs_on_the_cpu(tmp_path, monkeypatch, fresh_modules):
    hide(monkeypatch, "flashinfer", "flash_attn", "flash_attn_interface")
    bench = load_benchmark("attention_backends_gpu")
    out = tmp_path / "ab.json"
    res = bench.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == res["rows"]
    assert res["backends"] == ["sdpa"] and res["q_tokens"] == 48
    by = {(r["kv_tokens"], r["case"]): r for r in res["rows"]}
    assert set(by) == {(lk, c) for lk in (48, 96) for c in ("sdpa", "fp8kv", "fp8kv_write")}
    for lk in (48, 96):
        assert by[(lk, "sdpa")]["max_err"] == 0.0 and by[(lk, "sdpa")]["tflops"] > 0
        assert 1e-4 < by[(lk, "fp8kv")]["rel_err"] < 0.06  # the K/V quantisation, really applied
    assert res["kv_bytes_per_token"]["fp8"] * 2 == res["kv_bytes_per_token"]["bf16"]
    vids = {(r["backend"], r["kv_fp8"]): r for r in res["videos"]}  # whole videos of a random tiny Wan
    assert set(vids) == {("sdpa", False), ("sdpa", True)}
    assert vids[("sdpa", False)]["rel_err_vs_exact_sdpa"] == 0.0 and vids[("sdpa", True)]["seconds"] > 0
    assert 0 < vids[("sdpa", True)]["rel_err_vs_exact_sdpa"] < 0.05
