"""RoPE tables: exact angles at any position, memory flat for endless streams."""

import torch

from self_forcing.sf_model.rope import Rope3D


def table_rows(rope: Rope3D) -> int:
    return sum(entry[1].shape[0] for entry in rope._temporal.values())


def test_the_temporal_table_stays_the_same_size_for_an_endless_stream():
    rope = Rope3D(head_dim=16, split=(4, 2, 2), theta=10000.0, max_frames=32)
    rows = []
    for start in (0, 30, 1000, 10 ** 5, 10 ** 6, 10 ** 7):
        for s in range(start, start + 9, 3):  # a few chunks of 3 frames
            cos, sin = rope.cos_sin(s, 3, 2, 2, torch.device("cpu"))
            ref = rope.angles(s, 3, 2, 2)
            assert torch.allclose(cos[0, :, 0].double(), torch.cos(ref), atol=1e-6)
            assert torch.allclose(sin[0, :, 0].double(), torch.sin(ref), atol=1e-6)
        rows.append(table_rows(rope))
    assert max(rows) == 32  # the table never grows with the frame index (it grew to 2^k * 32 before)


def test_a_request_longer_than_the_table_is_served():
    rope = Rope3D(head_dim=16, split=(4, 2, 2), theta=10000.0, max_frames=4)
    cos, _ = rope.cos_sin(100, 10, 1, 1, torch.device("cpu"))
    assert torch.allclose(cos[0, :, 0].double(), torch.cos(rope.angles(100, 10, 1, 1)), atol=1e-6)
    assert table_rows(rope) == 20
