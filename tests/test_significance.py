"""McNemar's exact test and the report's sentence on whether the encoder beats raw pixels."""

import math

import numpy as np
import pytest

from nnclr_tf import evaluate, report


def correctness(only_a, only_b, both=0, neither=0, seed=0):
    """Per-image correctness of two classifiers with the given disagreement counts, shuffled."""
    a = np.array([True] * only_a + [False] * only_b + [True] * both + [False] * neither)
    b = np.array([False] * only_a + [True] * only_b + [True] * both + [False] * neither)
    order = np.random.default_rng(seed).permutation(len(a))
    return a[order], b[order]


def exact_two_sided(only_a, only_b):
    """The binomial tail with integers: 2 * sum_{i <= min} C(n, i) / 2^n, capped at 1."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


@pytest.mark.parametrize("only_a, only_b, expected", [
    (10, 2, 158 / 4096),  # 2 * (1 + 12 + 66) / 2^12
    (5, 0, 2 / 32),
    (0, 6, 2 / 64),
    (7, 7, 1.0),
    (3, 4, 1.0),  # 2 * P(X <= 3 | n=7) = 2 * 64 / 128
    (0, 0, 1.0),
])
def test_mcnemar_matches_hand_computed_values(only_a, only_b, expected):
    a, b = correctness(only_a, only_b)
    assert evaluate.mcnemar_exact_p(a, b) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_ignores_images_both_get_right_or_wrong_and_is_symmetric():
    a, b = correctness(12, 3)
    p = evaluate.mcnemar_exact_p(a, b)
    assert evaluate.mcnemar_exact_p(*correctness(12, 3, both=900, neither=85, seed=1)) == p
    assert evaluate.mcnemar_exact_p(b, a) == p


@pytest.mark.parametrize("only_a, only_b", [(5200, 4800), (260, 200), (1030, 1000)])
def test_mcnemar_with_many_disagreements_equals_integer_arithmetic(only_a, only_b):
    a, b = correctness(only_a, only_b)
    assert evaluate.mcnemar_exact_p(a, b) == pytest.approx(exact_two_sided(only_a, only_b), rel=1e-6)


def test_mcnemar_refuses_different_test_sets():
    with pytest.raises(ValueError, match="same images"):
        evaluate.mcnemar_exact_p(np.ones(5, bool), np.ones(6, bool))


def test_probes_return_their_predictions_when_asked():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    train_y, test_y = rng.integers(0, 3, 120), rng.integers(0, 3, 40)
    train_x = centres[train_y] + rng.normal(size=(120, 8))
    test_x = centres[test_y] + rng.normal(size=(40, 8)) * 2
    for probe, kwargs in ((evaluate.knn_accuracy, {"k": 5}), (evaluate.linear_probe_accuracy, {})):
        plain = probe(train_x, train_y, test_x, test_y, 3, **kwargs)
        assert "predictions" not in plain
        with_predictions = probe(train_x, train_y, test_x, test_y, 3, return_predictions=True,
                                 **kwargs)
        predictions = with_predictions.pop("predictions")
        assert with_predictions == plain and predictions.shape == (40,)
        assert np.mean(predictions == test_y) == plain["top1"] and plain["top1"] < 1.0


def test_paired_tests_need_the_same_labelled_images():
    labels = np.arange(10) % 3
    a = {"labels": labels, "knn": np.ones(10, bool), "linear": np.zeros(10, bool)}
    b = {"labels": labels, "knn": np.zeros(10, bool), "linear": np.zeros(10, bool)}
    tests = report.paired_tests(a, b)
    assert tests["knn_p"] == pytest.approx(2 / 1024) and tests["linear_p"] == 1.0
    assert report.paired_tests(a, {**b, "labels": labels[::-1]}) is None


@pytest.mark.parametrize("p_values, conclusion", [
    ((0.94, 0.71), "p = 0.940 (kNN) and p = 0.710 (linear probe), so neither difference is"),
    ((0.0001, 0.2), "p < 0.001 (kNN) and p = 0.200 (linear probe), so only the kNN difference is"),
    ((0.3, 0.049),
     "p = 0.300 (kNN) and p = 0.049 (linear probe), so only the linear-probe difference is"),
    ((0.01, 0.0), "p = 0.010 (kNN) and p < 0.001 (linear probe), so both differences are"),
])
def test_verdict_says_whether_the_differences_exceed_chance(p_values, conclusion):
    scores = {"trained": {"knn_top1": 0.812, "linear_top1": 0.852, "num_test": 2000},
              "raw_pixels": {"knn_top1": 0.811, "linear_top1": 0.855},
              "trained_vs_raw_pixels": {"knn_p": p_values[0], "linear_p": p_values[1]}}
    assert report.raw_pixel_verdict(scores, 784) == (
        "The trained encoder beats raw pixels on kNN (81.2 % vs 81.1 %) but not on the linear "
        f"probe (85.2 % vs 85.5 %); McNemar's exact test on these 2000 test images gives "
        f"{conclusion} significant at the 5 % level.")
