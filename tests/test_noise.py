"""Expert noise drawn ahead by worker threads: reproducible from the seed alone, standard normal, bounded."""

from __future__ import annotations

import pytest
import torch

from spectra_convert.surgery.noise import CHUNK, NoiseAhead
from spectra_convert.surgery.upcycle import noise_sizes, noise_workers

# Two layers of two tensors; the first spans three independently seeded pieces (the last one partial).
SIZES = [[2 * CHUNK + 1000, 3000], [CHUNK, 17]]


def draw_all(sizes: list[list[int]], seed: int, workers: int, layers_ahead: int = 1) -> list[list[torch.Tensor]]:
    with NoiseAhead(sizes, seed, workers=workers, layers_ahead=layers_ahead) as noise:
        return [noise.take(layer) for layer in range(len(sizes))]


def test_values_depend_on_seed_not_on_workers_or_lookahead() -> None:
    one = draw_all(SIZES, seed=7, workers=1, layers_ahead=1)
    three = draw_all(SIZES, seed=7, workers=3, layers_ahead=2)
    for layer_one, layer_three in zip(one, three):
        assert [t.numel() for t in layer_one] == [t.numel() for t in layer_three]
        for a, b in zip(layer_one, layer_three):
            assert torch.equal(a, b)
    other_seed = draw_all(SIZES, seed=8, workers=2)
    assert not torch.equal(one[0][0], other_seed[0][0])


def test_draws_are_standard_normal_and_pieces_independent() -> None:
    big = draw_all([[2 * CHUNK]], seed=0, workers=2)[0][0]
    assert big.dtype == torch.float32
    assert abs(float(big.mean())) < 1e-3 and abs(float(big.std()) - 1.0) < 1e-3
    first, second = big[:CHUNK], big[CHUNK:]
    assert not torch.equal(first[:1000], second[:1000])  # pieces have distinct seeds
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 2e-3
    # Gaussian, not merely unit variance: the share beyond 3 sigma is 0.27%.
    assert 0.0024 < float((big.abs() > 3).float().mean()) < 0.0030


def test_layers_are_taken_in_order_and_lookahead_is_bounded() -> None:
    sizes = [[10]] * 5
    with NoiseAhead(sizes, seed=0, workers=2, layers_ahead=2) as noise:
        with pytest.raises(KeyError, match="layer 2 was not scheduled"):
            noise.take(2)  # only layers 0 and 1 may exist before layer 0 is taken
        noise.take(0)
        assert noise.take(1)[0].numel() == 10
        with pytest.raises(KeyError):
            noise.take(1)  # once
        assert [noise.take(layer)[0].numel() for layer in (2, 3, 4)] == [10, 10, 10]


def test_noise_sizes_cover_non_bias_tensors_only() -> None:
    shapes = {"up": (6, 4), "up_bias": (6,), "down": (4, 6), "down_bias": (4,)}
    assert noise_sizes(shapes, experts=3, method="copy") == {"up": 72, "down": 72}
    assert noise_sizes(shapes, experts=3, method="drop") == {"up": 72, "down": 72}


@pytest.mark.parametrize("cores, expected", [(1, 2), (2, 2), (8, 6), (16, 12)])
def test_noise_workers_leave_a_quarter_of_the_cores(cores: int, expected: int) -> None:
    assert noise_workers(cores) == expected


def test_noise_workers_run_at_the_lowest_priority() -> None:
    """Background draws must not compete with the main thread at equal priority (Linux: per-thread nice)."""
    import os
    import threading

    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []
    with NoiseAhead([[10]], seed=0, workers=1) as noise:
        noise._pool.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))).result()
        noise.take(0)
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller  # the caller is untouched


def test_recycled_buffers_are_drawn_into_again_with_the_same_values() -> None:
    sizes = [[3000, 17]] * 4
    expected = draw_all(sizes, seed=5, workers=2)
    with NoiseAhead(sizes, seed=5, workers=2, layers_ahead=1) as noise:
        first = noise.take(0)  # layer 1 is scheduled now, before anything is recycled
        addresses = {t.data_ptr() for t in first}
        for buffer in first:
            buffer.fill_(123.0)  # written out and no longer needed: its values must not leak into later layers
            noise.recycle(buffer)
        got = [first, noise.take(1), noise.take(2), noise.take(3)]
        assert {t.data_ptr() for t in got[2]} == addresses  # layer 2 reuses layer 0's memory
    for layer in (1, 2, 3):
        assert all(torch.equal(a, b) for a, b in zip(got[layer], expected[layer]))
    with NoiseAhead(sizes, seed=5) as noise, pytest.raises(ValueError, match="recycled"):
        noise.recycle(torch.zeros(3000, dtype=torch.float64))
