"""Is one classifier better than another on the same test images? McNemar's exact test.

Two accuracies measured on one test set are paired: most images are right (or wrong) for both, and
only the images where the two disagree carry information. With b images that only the first gets
right and c that only the second gets right, under "equally accurate" each disagreement goes
either way with probability 1/2, so the two-sided p-value is 2 P(Binomial(b + c, 1/2) <= min(b, c)),
capped at 1 (McNemar, 1947; the exact form of Edwards' chi-squared test).

    p = mcnemar_exact_p(predictions_a == labels, predictions_b == labels)
"""

import math

import numpy as np


def _log_binomial_cdf_half(k: int, n: int) -> float:
    """log P(Binomial(n, 1/2) <= k), summed in log space (n may be tens of thousands)."""
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
             for i in range(k + 1)]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms)) - n * math.log(2.0)


def mcnemar_exact_p(correct_a, correct_b) -> float:
    """Two-sided exact McNemar p-value of two classifiers' per-image correctness on the same images.

    Args:
      correct_a, correct_b: [N] booleans, image i classified right by classifier a / b.

    Returns:
      p in (0, 1]: 1.0 when the two never disagree; small when one wins most disagreements.
    """
    a = np.asarray(correct_a, bool).reshape(-1)
    b = np.asarray(correct_b, bool).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(
            f"McNemar's test needs the same images for both; got {a.size} and {b.size}.")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a == only_b:
        return 1.0
    n = only_a + only_b
    return min(1.0, 2.0 * math.exp(_log_binomial_cdf_half(min(only_a, only_b), n)))
