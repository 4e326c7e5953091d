"""The index arithmetic of the CUDA Gram kernels, checked on CPU (no GPU can run them here).

The formulas are transcribed from csrc/cuda/gram.cu (the constants are read from the sources, so a change
there is seen here): the register-blocked m >= 9 path must write every pair (a <= b < m) of the packed
upper triangle exactly once, its group reduction must fit the shared tile it reuses, the packed pair index
must be a bijection, and the global reduction levels must cover every partial exactly once.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "csrc" / "cuda"


def _const(name: str) -> int:
    for f in ("gram.cu", "multi_tensor.cuh"):
        m = re.search(rf"constexpr (?:int|int64_t|size_t) {name} = ([^;]+);", (SRC / f).read_text())
        if m:
            expr = m.group(1).replace("int64_t(1)", "1")
            return int(eval(expr, {}))  # simple constant expressions such as 1 << 16
    raise AssertionError(f"{name} not found in csrc/cuda")


def _pair_index(a: int, b: int, m: int) -> int:
    return a * m - a * (a - 1) // 2 + (b - a)  # gram.cu: a * m - a * (a - 1) / 2 + (b - a)


def _block_of(q: int, nb: int) -> tuple[int, int]:
    a, rem = 0, q
    while rem >= nb - a:  # gram.cu: while (rem >= nb - A) { rem -= nb - A; ++A; }
        rem -= nb - a
        a += 1
    return a, a + rem


@pytest.mark.parametrize("m", range(1, 65))
def test_packed_pair_index_is_a_bijection(m):
    idx = [_pair_index(a, b, m) for a in range(m) for b in range(a, m)]
    assert sorted(idx) == list(range(m * (m + 1) // 2))
    # and the reduce kernel's inverse (pair p -> (a, c)) matches
    for p in range(m * (m + 1) // 2):
        a, c = _block_of(p, m)
        assert _pair_index(a, c, m) == p


@pytest.mark.parametrize("m", range(9, 65))
def test_register_blocks_cover_every_pair_once(m):
    threads, rb, max_m, tile = _const("kThreads"), _const("kRB"), _const("kMaxM"), _const("kTile")
    nb = -(-m // rb)
    NB = nb * (nb + 1) // 2
    G = threads // NB
    assert G >= 1 and nb * rb <= max_m
    assert threads * rb * rb * 8 <= 4 * max_m * (tile + 1)  # the static_assert: group sums fit the tile
    written = []
    for q in range(NB * rb * rb):  # the reduction loop over (block, entry)
        qb, ij = divmod(q, rb * rb)
        qa, qb2 = _block_of(qb, nb)
        a, b = qa * rb + ij // rb, qb2 * rb + ij % rb
        if a < m and b < m and a <= b:
            written.append(_pair_index(a, b, m))
    assert sorted(written) == list(range(m * (m + 1) // 2))
    # every element of a tile is visited by exactly one group: e = g, g + G, ...
    for cnt in (1, 7, tile):
        seen = sorted(e for g in range(G) for e in range(g, cnt, G))
        assert seen == list(range(cnt))


@pytest.mark.parametrize("segments,levels", [(1, 0), (255, 0), (256, 0), (257, 1), (65536, 1), (65537, 2),
                                             (1_050_000, 2)])
def test_global_reduction_levels_cover_every_partial(segments, levels):
    span = _const("kSpan")
    assert span == 256  # the expected level counts below assume it
    rows, passes = segments, 0
    while rows > span:  # gram.cu: while (rows > kSpan) { blocks = ceil(rows / kSpan); ... }
        blocks = -(-rows // span)
        covered = [r for b in range(blocks) for r in range(b * span, min(rows, b * span + span))]
        assert covered == list(range(rows))
        rows, passes = blocks, passes + 1
    assert rows <= span and passes == levels  # then one block sums the rest
