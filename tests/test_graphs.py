"""CUDA-graph replay of the block forward (sf_model.speed.graphs), exercised on the CPU with a stand-in
recorder that behaves like a CUDA graph where it matters: what it replays is fixed at recording time
(the cache slots it writes/reads, the forward it ran) and it sees new inputs only through the static
buffers. The real CUDA graphs are compared with eager forwards by benchmarks/gpu_checks.py."""

import pytest
import torch

from self_forcing.sf_model.config import TINY
from self_forcing.sf_model.sampler import StreamOptions, generate
from self_forcing.sf_model.speed import ChunkGraphs, use_cuda_graphs, use_fused_kernels


class StandInGraphs(ChunkGraphs):
    """Records by running the forward on the static inputs; a replay re-runs that recorded forward
    on the static inputs, with the cache plan of the recording, into the recorded output tensor."""

    def __init__(self, cache_of, max_graphs=32):
        super().__init__(max_graphs)
        self.cache_of = cache_of

    def accepts(self, x):
        return True

    def _capture(self, forward, static):
        cache = self.cache_of()
        plan = cache.plan
        out = forward(static[0], static[1], (static[2], static[3]))

        def replay():
            current, cache.plan = cache.plan, plan
            try:
                out.copy_(forward(static[0], static[1], (static[2], static[3])))
            finally:
                cache.plan = current
        return replay, out


def with_graphs(model, max_graphs=32, window=None, frames=9, h=4, w=6):
    cache = model.new_cache(1, (h // 2) * (w // 2), window=window or frames)
    graphs = StandInGraphs(lambda: cache, max_graphs)
    use_cuda_graphs(model, graphs=graphs)
    return cache, graphs


CTX = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fused", [False, True])
def test_replayed_video_equals_eager_and_one_graph_serves_a_chunk(make_tiny, fused):
    eager = make_tiny(TINY, seed=4)
    graphed = make_tiny(TINY, seed=4)
    if fused:
        use_fused_kernels(eager)
        use_fused_kernels(graphed)
    cache, graphs = with_graphs(graphed)
    opts = StreamOptions(frames_per_block=3)
    ref = generate(eager, CTX, num_frames=9, height=4, width=6, seed=2, options=opts)
    out = generate(graphed, CTX, num_frames=9, height=4, width=6, seed=2, options=opts, cache=cache)
    assert torch.equal(out, ref)
    # 3 chunks x (4 denoising passes + 1 cache pass), minus the skipped last cache pass = 14 forwards:
    # one recording per chunk, the other forwards of the chunk replay it
    assert (graphs.recorded, graphs.replayed) == (3, 11)
    again = generate(graphed, CTX, num_frames=9, height=4, width=6, seed=5, options=opts, cache=cache)
    assert torch.equal(again, generate(eager, CTX, num_frames=9, height=4, width=6, seed=5, options=opts))
    assert (graphs.recorded, graphs.replayed) == (3, 25)  # same buffers: the second video only replays


def test_rolling_cache_cycles_through_few_graphs_with_the_right_positions(make_tiny):
    eager = make_tiny(TINY, seed=6)
    graphed = make_tiny(TINY, seed=6)
    cache, graphs = with_graphs(graphed, window=6, frames=24)
    opts = StreamOptions(frames_per_block=3, window=6, extend_positions=True)
    ref = generate(eager, CTX, num_frames=24, height=4, width=6, seed=1, options=opts)
    out = generate(graphed, CTX, num_frames=24, height=4, width=6, seed=1, options=opts, cache=cache)
    # a replay at a new absolute position must use that position's RoPE angles, not the recorded ones
    assert torch.equal(out, ref)
    # slot patterns: [0,3) alone, [3,6) with [0,3), then [0,3) and [3,6) of a full ring, repeating
    assert graphs.recorded == 3 and len(graphs.graphs) == 3


def test_graph_count_is_bounded_and_results_stay_exact(make_tiny):
    eager = make_tiny(TINY, seed=7)
    graphed = make_tiny(TINY, seed=7)
    cache, graphs = with_graphs(graphed, max_graphs=2)
    opts = StreamOptions(frames_per_block=3)
    ref = generate(eager, CTX, num_frames=9, height=4, width=6, seed=3, options=opts)
    for _ in range(2):
        out = generate(graphed, CTX, num_frames=9, height=4, width=6, seed=3, options=opts, cache=cache)
        assert torch.equal(out, ref)
        assert len(graphs.graphs) <= 2
    assert graphs.recorded == 6  # 3 situations cycling through 2 places: each is re-recorded


def test_a_new_prompt_or_moved_weights_never_replay_stale_graphs(make_tiny):
    eager = make_tiny(TINY, seed=8)
    graphed = make_tiny(TINY, seed=8)
    cache, graphs = with_graphs(graphed)
    opts = StreamOptions(frames_per_block=3)
    generate(graphed, CTX, num_frames=9, height=4, width=6, seed=3, options=opts, cache=cache)
    other = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(9))
    out = generate(graphed, other, num_frames=9, height=4, width=6, seed=3, options=opts, cache=cache)
    assert torch.equal(out, generate(eager, other, num_frames=9, height=4, width=6, seed=3, options=opts))
    graphed.to(torch.float64).to(torch.float32)  # moving the weights drops every recording
    assert len(graphs.graphs) == 0
    before = graphs.recorded
    use_fused_kernels(graphed)
    use_fused_kernels(eager)
    out = generate(graphed, CTX, num_frames=9, height=4, width=6, seed=3, options=opts, cache=cache)
    assert torch.equal(out, generate(eager, CTX, num_frames=9, height=4, width=6, seed=3, options=opts))
    assert graphs.recorded == before + 3


def test_gradient_forwards_and_cpu_tensors_stay_eager(make_tiny):
    model = use_cuda_graphs(make_tiny(TINY, seed=1))
    assert not model.chunk_graphs.accepts(torch.zeros(1))  # the real recorder only takes CUDA tensors
    generate(model, CTX, num_frames=3, height=4, width=6, seed=0)
    assert model.chunk_graphs.recorded == 0 and model.chunk_graphs.replayed == 0
    use_cuda_graphs(model, False)
    assert model.chunk_graphs is None
    with pytest.raises(ValueError, match="max_graphs"):
        ChunkGraphs(0)


def test_a_recording_failure_falls_back_to_eager_for_good(make_tiny):
    class Failing(StandInGraphs):
        def _capture(self, forward, static):
            raise RuntimeError("operation not permitted when stream is capturing")

    eager = make_tiny(TINY, seed=2)
    graphed = make_tiny(TINY, seed=2)
    cache = graphed.new_cache(1, 6, window=9)
    graphs = Failing(lambda: cache)
    use_cuda_graphs(graphed, graphs=graphs)
    with pytest.warns(UserWarning, match="running eagerly"):
        out = generate(graphed, CTX, num_frames=9, height=4, width=6, seed=2, cache=cache)
    assert torch.equal(out, generate(eager, CTX, num_frames=9, height=4, width=6, seed=2))
    assert "not permitted" in graphs.failed and graphs.recorded == 0 and not graphs.graphs


def test_a_prompt_of_other_shape_clears_the_recordings(make_tiny):
    eager = make_tiny(TINY, seed=9)
    graphed = make_tiny(TINY, seed=9)
    cache, graphs = with_graphs(graphed)
    generate(graphed, CTX, num_frames=9, height=4, width=6, seed=3, cache=cache)
    assert len(graphs.graphs) == 3
    pair = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(4))  # a batch of two prompts
    out = generate(graphed, pair, num_frames=9, height=4, width=6, seed=3)  # its own cache
    assert torch.equal(out, generate(eager, pair, num_frames=9, height=4, width=6, seed=3))
    assert graphs.recorded == 6 and len(graphs.graphs) == 3  # the batch-1 recordings were dropped


def test_cuda_malloc_async_keeps_graphs_off_and_the_video_exact(make_tiny, monkeypatch):
    # ComfyUI sets PyTorch's cudaMallocAsync backend by default; recording there aborted the whole server
    # process on an H200 (a captured allocation freed outside the capture). Graphs must stay off, eagerly exact.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    eager = make_tiny(TINY, seed=4)
    graphed = make_tiny(TINY, seed=4)
    cache, graphs = with_graphs(graphed)
    captured = []
    monkeypatch.setattr(graphs, "_capture", lambda *a: captured.append(a) or pytest.fail("recorded a graph"))
    opts = StreamOptions(frames_per_block=3)
    with pytest.warns(UserWarning, match="cudaMallocAsync"):
        out = generate(graphed, CTX, num_frames=9, height=4, width=6, seed=2, options=opts, cache=cache)
    assert torch.equal(out, generate(eager, CTX, num_frames=9, height=4, width=6, seed=2, options=opts))
    assert (graphs.recorded, graphs.replayed, captured) == (0, 0, [])
    assert "--disable-cuda-malloc" in graphs.failed


def test_native_allocator_still_records(make_tiny, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    graphed = make_tiny(TINY, seed=4)
    cache, graphs = with_graphs(graphed)
    generate(graphed, CTX, num_frames=9, height=4, width=6, seed=2, options=StreamOptions(frames_per_block=3),
             cache=cache)
    assert graphs.failed is None and graphs.recorded == 3


def test_the_loader_info_says_whether_cuda_graphs_run(make_tiny, monkeypatch):
    from self_forcing.nodes.model import ModelHandle, describe
    from self_forcing.sf_model.checkpoint import LoadedModel

    model = make_tiny(TINY, seed=4)
    handle = ModelHandle(LoadedModel(model, model.config, "test", {}), "tiny", torch.device("cpu"),
                         torch.device("cpu"), torch.float32)
    assert "CUDA graphs" not in describe(handle)  # no recorder (the CPU): nothing to say
    use_cuda_graphs(model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    assert "CUDA graphs: off - PyTorch's cudaMallocAsync allocator is active" in describe(handle)
    assert "--disable-cuda-malloc" in describe(handle)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    assert "CUDA graphs: on" in describe(handle)
