import itertools
import math
import queue
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from owlore_ds.distributed import free_port
from owlore_ds.sampler import LayerSampler, layer_probabilities

RATIOS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 12.0]  # skewed, so sampling without replacement matters


def test_probability_formulas():
    L = 8
    d = torch.tensor(RATIOS, dtype=torch.float64)
    owl = d / d.sum()
    expected = {
        "uniform": torch.full((L,), 1 / L, dtype=torch.float64),
        "owl": owl,
        "owl_reverse": (owl.max() - owl) / (owl.max() - owl).sum(),
        "increase": torch.tensor([l + 1 for l in range(L)], dtype=torch.float64) / sum(range(1, L + 1)),
        "decrease": torch.tensor([L - l for l in range(L)], dtype=torch.float64) / sum(range(1, L + 1)),
    }
    for mode, want in expected.items():
        got = layer_probabilities(mode, L, RATIOS)
        torch.testing.assert_close(got, want)
        assert math.isclose(float(got.sum()), 1.0)
    # The most outlier-heavy layer is never picked in owl_reverse mode.
    assert layer_probabilities("owl_reverse", L, RATIOS)[-1] == 0


def test_owl_reverse_all_equal_is_uniform():
    torch.testing.assert_close(layer_probabilities("owl_reverse", 4, [2.0] * 4), torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize(
    "mode, ratios, message",
    [
        ("lisa", None, "unknown layer sampling mode 'lisa'"),
        ("owl", None, "need outlier_ratios"),
        ("owl_reverse", [1.0, 2.0], "2 outlier ratios for 4 layers"),
        ("owl", [0.0] * 4, "all zero"),
        ("owl", [1.0, -1.0, 1.0, 1.0], ">= 0"),
    ],
)
def test_probability_errors(mode, ratios, message):
    with pytest.raises(ValueError, match=message):
        layer_probabilities(mode, 4, ratios)


def test_interval_index():
    s = LayerSampler(8, 2, 50, layer_probabilities("uniform", 8, None), seed=0)
    assert [s.interval_index(t) for t in (0, 49, 50, 99, 100)] == [0, 0, 1, 1, 2]


def test_draw_is_a_pure_function_of_seed_and_interval():
    p = layer_probabilities("owl", 8, RATIOS)
    a, b = LayerSampler(8, 3, 50, p, seed=42), LayerSampler(8, 3, 50, p, seed=42)
    forward = [a.layers_for_interval(k) for k in range(20)]
    torch.manual_seed(123)  # the global RNG must not matter
    backward = [b.layers_for_interval(k) for k in reversed(range(20))][::-1]
    assert forward == backward
    assert a.layers_for_interval(7) == forward[7]  # repeated calls too
    for layers in forward:
        assert layers == sorted(set(layers)) and len(layers) == 3 and all(0 <= l < 8 for l in layers)
    assert len({tuple(x) for x in forward}) > 5  # intervals really differ
    other_seed = [LayerSampler(8, 3, 50, p, seed=43).layers_for_interval(k) for k in range(20)]
    assert other_seed != forward


def test_all_layers_and_nonzero_counting():
    p = layer_probabilities("owl_reverse", 4, [1.0, 2.0, 3.0, 4.0])  # layer 3 has p = 0
    assert LayerSampler(4, 4, 10, p, seed=0).layers_for_interval(5) == [0, 1, 2, 3]
    assert LayerSampler(4, 9, 10, p, seed=0).layers_for_interval(5) == [0, 1, 2, 3]
    for k in range(50):  # the zero-probability layer is never drawn
        assert 3 not in LayerSampler(4, 3, 10, p, seed=0).layers_for_interval(k)
    with pytest.raises(ValueError, match="only 2 of 4 layers have probability > 0"):
        LayerSampler(4, 3, 10, [0.5, 0.5, 0.0, 0.0], seed=0)
    with pytest.raises(ValueError, match="shape"):
        LayerSampler(4, 2, 10, [0.5, 0.5], seed=0)


def test_single_layer_frequencies_match_p():
    p = layer_probabilities("owl", 8, RATIOS)
    n = 4000
    s = LayerSampler(8, 1, 50, p, seed=2024)
    counts = torch.zeros(8, dtype=torch.float64)
    for k in range(n):
        counts[s.layers_for_interval(k)[0]] += 1
    expected = n * p
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # chi-square critical value for 7 degrees of freedom at p = 0.001
    assert chi2 < 24.322, (chi2, counts.tolist(), expected.tolist())


def exact_inclusion_probabilities(p: list[float], gamma: int) -> list[float]:
    """P(layer in draw) for sequential sampling without replacement, by enumerating ordered draws."""
    incl = [0.0] * len(p)
    for seq in itertools.permutations(range(len(p)), gamma):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        for i in seq:
            incl[i] += prob
    return incl


def test_multi_layer_inclusion_matches_sequential_sampling():
    gamma, n = 3, 4000
    p = layer_probabilities("owl", 8, RATIOS)
    incl = torch.tensor(exact_inclusion_probabilities(p.tolist(), gamma), dtype=torch.float64)
    assert math.isclose(float(incl.sum()), gamma)
    # Guard the test's power: the naive gamma * p is clearly different here.
    assert (incl - gamma * p).abs().max() > 0.05

    s = LayerSampler(8, gamma, 50, p, seed=7)
    counts = torch.zeros(8, dtype=torch.float64)
    for k in range(n):
        counts[s.layers_for_interval(k)] += 1
    z = (counts - n * incl) / (n * incl * (1 - incl)).sqrt()
    # |z| < 4 per layer: family-wise false alarm below 8 * 6.3e-5
    assert z.abs().max() < 4.0, (counts.tolist(), (n * incl).tolist())


def test_synchronized_without_distributed_is_local_draw():
    assert not dist.is_initialized()
    s = LayerSampler(8, 3, 50, layer_probabilities("uniform", 8, None), seed=1)
    assert s.synchronized_layers(4) == s.layers_for_interval(4)


class _OffByOne(LayerSampler):
    """Same settings as its peers but a different draw (e.g. another torch version's multinomial)."""

    def layers_for_interval(self, k: int) -> list[int]:
        return [(layer + 1) % self.num_layers for layer in super().layers_for_interval(k)]


def _worker(rank: int, port: int, results) -> None:
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
        )
        p = layer_probabilities("owl", 8, RATIOS)
        agreed = [LayerSampler(8, 3, 50, p, seed=7).synchronized_layers(k) for k in range(5)]
        errors = []
        for sampler in (LayerSampler(8, 3, 50, p, seed=7 + rank), (_OffByOne if rank else LayerSampler)(8, 3, 50, p, 7)):
            try:
                sampler.synchronized_layers(2)
                errors.append(None)
            except RuntimeError as e:
                errors.append(str(e))
        results.put((rank, agreed, errors))
        dist.destroy_process_group()
    except BaseException as e:  # report instead of leaving the parent waiting
        results.put((rank, None, [repr(e)]))


def test_two_ranks_agree_and_detect_disagreement():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, results), daemon=True) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        out = {}
        for _ in range(2):
            rank, agreed, errors = results.get(timeout=45)
            out[rank] = (agreed, errors)
    except queue.Empty:
        pytest.fail("distributed workers did not report within 45 s")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    expected = [LayerSampler(8, 3, 50, layer_probabilities("owl", 8, RATIOS), seed=7).layers_for_interval(k) for k in range(5)]
    for rank in (0, 1):
        agreed, errors = out[rank]
        assert agreed == expected, errors
        # Both scenarios raise on BOTH ranks (rank 0 is not the one at fault, but must not carry on alone).
        assert all(e is not None and "ranks [1] disagree with rank 0" in e for e in errors), errors
    assert "this rank 1 has [2, 8, 3, 8, " in out[1][1][0]  # rank 1 reports its own (wrong) seed
