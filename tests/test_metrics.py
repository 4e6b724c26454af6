"""Every validate metric pinned on hand-checkable inputs (docs/ARCHITECTURE.md, "Metrics")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spectra_convert.router import metrics as m

E = 8


def test_expert_loads_and_assignment_matrix():
    selected = np.array([[0, 1], [1, 2], [1, 0]])
    assert m.expert_loads(selected, 4).tolist() == [2, 3, 1, 0]
    a = m.assignment_matrix(selected, 4)
    assert a.tolist() == [[True, True, False, False], [False, True, True, False], [True, True, False, False]]
    # -1 means "no expert" (a token dropped by expert choice)
    assert m.assignment_matrix(np.array([[-1], [3]]), 4).sum() == 1


def test_uniform_loads_are_perfectly_balanced():
    loads = np.full(E, 10.0)
    assert m.load_cv(loads) == 0.0
    assert m.max_vio(loads) == 0.0
    assert m.gini(loads) == pytest.approx(0.0)
    assert m.min_max_ratio(loads) == 1.0
    assert m.expert_entropy(loads) == pytest.approx(math.log(E))
    assert m.normalized_expert_entropy(loads) == pytest.approx(1.0)
    assert m.collapse_rate(loads) == 0.0


def test_one_expert_takes_all():
    loads = np.zeros(E)
    loads[3] = 100
    assert m.collapse_rate(loads) == pytest.approx((E - 1) / E)
    assert m.gini(loads) == pytest.approx((E - 1) / E)
    assert m.max_vio(loads) == pytest.approx(E - 1)
    assert m.min_max_ratio(loads) == 0.0
    assert m.expert_entropy(loads) == 0.0
    assert m.normalized_expert_entropy(loads) == 0.0
    # population std of [0]*7 + [100] is sqrt(7)*12.5, mean 12.5 -> CV sqrt(E-1)
    assert m.load_cv(loads) == pytest.approx(math.sqrt(E - 1))


def test_small_hand_computed_loads():
    loads = [1.0, 3.0]
    assert m.load_cv(loads) == pytest.approx(0.5)  # std 1, mean 2
    assert m.max_vio(loads) == pytest.approx(0.5)  # 3/2 - 1
    assert m.gini(loads) == pytest.approx(0.25)  # ((-1)*1 + 1*3) / (2*4)
    assert m.min_max_ratio(loads) == pytest.approx(1 / 3)
    assert m.expert_entropy(loads) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    # collapse threshold is p < 0.1/E: with E = 4, 1/100 is below 0.025, 4/100 is not
    assert m.collapse_rate([1, 4, 45, 50]) == pytest.approx(0.25)


def test_balance_metrics_keys_and_empty_loads():
    got = m.balance_metrics([5, 5])
    assert set(got) == {"cv", "maxvio", "gini", "min_max", "expert_entropy", "expert_entropy_norm", "collapse_rate"}
    assert math.isnan(m.load_cv([0, 0]))
    with pytest.raises(ValueError):
        m.load_cv([])


def test_routing_entropy():
    # equal scores -> uniform softmax -> entropy log E, whatever the temperature
    assert m.routing_entropy(np.zeros((5, E)), 0.1) == pytest.approx(math.log(E))
    # one score far above the rest at a low temperature -> one-hot -> entropy ~ 0
    scores = np.full((3, E), -1.0)
    scores[:, 2] = 1.0
    assert m.routing_entropy(scores, 0.01) == pytest.approx(0.0, abs=1e-12)
    # two equal winners -> log 2
    scores[:, 5] = 1.0
    assert m.routing_entropy(scores, 0.01) == pytest.approx(math.log(2))


def test_gram_orthogonality():
    assert m.gram_orthogonality(np.eye(E)) == pytest.approx(1.0)
    assert m.mean_abs_off_diagonal(np.eye(E)) == pytest.approx(0.0)
    # orthonormal after normalisation: scaled rotated basis still scores 1
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 16)))
    assert m.gram_orthogonality(3.0 * q[:E]) == pytest.approx(1.0)
    # identical vectors: G = all ones, ||G - I||_F = sqrt(E^2 - E)
    same = np.ones((E, 4))
    assert m.mean_abs_off_diagonal(same) == pytest.approx(1.0)
    assert m.gram_orthogonality(same) == pytest.approx(1 - math.sqrt(E * E - E) / (E * math.sqrt(2)))
    # antipodal vectors count as fully non-orthogonal in |G|
    assert m.mean_abs_off_diagonal(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(1.0)


def test_expert_overlap():
    # experts 0 and 1 share token 0 of tokens {0,1} and {0,2}: Jaccard 1/3; other pairs 0 (expert 2 unused)
    a = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=bool)
    assert m.expert_overlap(a) == pytest.approx((1 / 3 + 0 + 0) / 3)
    # every token uses every expert -> 1
    assert m.expert_overlap(np.ones((4, 3), dtype=bool)) == pytest.approx(1.0)
    # disjoint tokens -> 0
    assert m.expert_overlap(np.eye(3, dtype=bool)) == 0.0


def test_sequential_consistency_never_crosses_sequences():
    top1 = np.array([0, 0, 1, 1, 1, 2])
    seq = np.array([0, 0, 0, 1, 1, 1])
    # pairs inside seq 0: (0,0) same, (0,1) diff; seq 1: (1,1) same, (1,2) diff -> 2/4; the 1->1 boundary is skipped
    assert m.sequential_consistency(top1, seq) == pytest.approx(0.5)
    assert m.sequential_consistency(np.array([3, 3, 3]), np.zeros(3)) == 1.0
    assert math.isnan(m.sequential_consistency(np.array([1, 2]), np.array([0, 1])))
    # -1 (token without expert) never counts as consistent
    assert m.sequential_consistency(np.array([-1, -1]), np.zeros(2)) == 0.0
    with pytest.raises(ValueError):
        m.sequential_consistency(np.array([1, 2]), np.zeros(3))


def test_topk_overlap():
    sel = np.array([[0, 1], [1, 2], [1, 2], [5, 6]])
    a = m.assignment_matrix(sel, E)
    # {0,1}->{1,2}: 1/3; {1,2}->{1,2}: 1; {1,2}->{5,6}: 0
    assert m.topk_overlap(a, np.zeros(4)) == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert m.topk_overlap(a, np.array([0, 0, 1, 1])) == pytest.approx((1 / 3 + 0) / 2)


def test_routing_consistency_and_agreement():
    a = np.array([[0, 1], [2, 3], [4, 5]])
    b = np.array([[1, 0], [2, 4], [6, 7]])  # same set, half, none
    assert m.routing_consistency(a, b) == pytest.approx(1 / 3)
    assert m.routing_consistency(a, a) == 1.0
    assert m.topk_agreement(a, b) == pytest.approx((1 + 0.5 + 0) / 3)
    # a k=1 router against a k=2 gate: share of the gate's choices kept
    assert m.topk_agreement(np.array([[0], [3]]), np.array([[0, 1], [2, 3]])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        m.routing_consistency(a, a[:2])


def test_domain_nmi():
    domains = np.array(["code"] * 4 + ["legal"] * 4)
    assert m.domain_nmi(np.array([0] * 4 + [1] * 4), domains) == pytest.approx(1.0)
    # expert label permutation does not matter
    assert m.domain_nmi(np.array([5] * 4 + [2] * 4), domains) == pytest.approx(1.0)
    # experts independent of domain -> 0
    assert m.domain_nmi(np.array([0, 1, 0, 1, 0, 1, 0, 1]), domains) == pytest.approx(0.0)
    # one constant labeling -> 0; two constant labelings -> 1 (scikit-learn's convention)
    assert m.domain_nmi(np.zeros(8), domains) == 0.0
    assert m.domain_nmi(np.zeros(3), np.array(["a"] * 3)) == 1.0
    # hand-computed: x = [0,0,1,1], y = [a,a,a,b]; H(x)=log2, H(y)=H(3/4,1/4), H(x,y)=H(1/2,1/4,1/4)
    hx = math.log(2)
    hy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    hxy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    expected = (hx + hy - hxy) / ((hx + hy) / 2)
    assert m.domain_nmi(np.array([0, 0, 1, 1]), np.array(["a", "a", "a", "b"])) == pytest.approx(expected)


def test_perplexity():
    assert m.perplexity(0.0, 10) == 1.0
    assert m.perplexity(10 * math.log(50.0), 10) == pytest.approx(50.0)
    assert math.isnan(m.perplexity(1.0, 0))


def test_routing_metrics_bundle():
    sel = np.array([[0, 1], [0, 1], [2, 3], [2, 3]])
    got = m.routing_metrics(m.assignment_matrix(sel, 4), sel[:, 0], np.array([0, 0, 1, 1]),
                            np.array(["x", "x", "y", "y"]))
    assert got["cv"] == 0.0
    assert got["seq_consistency"] == 1.0
    assert got["topk_overlap"] == 1.0
    assert got["domain_nmi"] == pytest.approx(1.0)
    assert got["expert_overlap"] == pytest.approx((1 + 0 + 0 + 0 + 0 + 1) / 6)
    assert math.isnan(m.routing_metrics(m.assignment_matrix(sel, 4), sel[:, 0], np.zeros(4))["domain_nmi"])
