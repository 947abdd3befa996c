"""Distribution metrics on feature vectors and pixels.

Short functions of numpy arrays, so each can be checked on inputs whose answer
is known. Features are the reference classifier's embeddings ``(N, D)``.
"""

import warnings

import numpy as np
import scipy.linalg


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to ``a (N, D)`` and ``b (M, D)``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. 0 for equal statistics."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # A small ridge keeps the product's square root defined when few samples
    # make a covariance near-singular; it shifts the distance by ~1e-6 * D.
    eps = 1e-6 * np.eye(len(mu_a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    value = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real)
    return float(max(value, 0.0))


def pairwise_distances(a, b, chunk=1024):
    """Euclidean distances ``(N, M)`` between the rows of ``a`` and ``b`` (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    b_sq = (b**2).sum(1)
    out = np.empty((len(a), len(b)))
    for i in range(0, len(a), chunk):
        part = a[i:i + chunk]
        sq = (part**2).sum(1)[:, None] + b_sq[None, :] - 2 * part @ b.T
        out[i:i + chunk] = np.sqrt(np.maximum(sq, 0.0))
    return out


def knn_radii(features, k):
    """Distance of each row to its k-th nearest other row ``(N,)``."""
    d = pairwise_distances(features, features)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its points, of radius
    the distance to the k-th nearest neighbour within the set. Precision: the
    share of ``fake`` inside the real manifold (are samples realistic?);
    recall: the share of ``real`` inside the fake manifold (is the variety
    covered?). Returns ``(precision, recall)``.
    """
    real_r, fake_r = knn_radii(real, k), knn_radii(fake, k)
    d = pairwise_distances(fake, real)  # (fake, real)
    precision = float((d <= real_r[None, :]).any(axis=1).mean())
    recall = float((d <= fake_r[:, None]).any(axis=0).mean())
    return precision, recall


def flatten_pixels(images_uint8):
    """uint8 ``(N, C, H, W)`` -> float64 ``(N, C*H*W)`` in [0, 1] divided by
    sqrt(C*H*W), so Euclidean distances are root-mean-square pixel differences."""
    x = np.asarray(images_uint8, dtype=np.float64).reshape(len(images_uint8), -1) / 255.0
    return x / np.sqrt(max(x.shape[1], 1))


def nearest(queries, references):
    """``(distance, index)`` of each query's nearest reference row."""
    d = pairwise_distances(queries, references)
    index = d.argmin(axis=1)
    return d[np.arange(len(queries)), index], index


def memorisation(generated, train, heldout, threshold=0.5):
    """Which generated images are (near) copies of training images.

    Distances are RMS pixel differences. A real held-out image, a fresh walk,
    sits at some typical distance from its nearest training image; the ratio
    of a sample's nearest-training distance to the median of those real ones
    says how much closer than a fresh walk it is. Samples with a ratio below
    ``threshold`` are flagged.

    :return: dict with ``ratio (N,)``, ``train_index (N,)``, ``flagged``
        (indices), ``real_median`` and ``real_min_ratio`` (the smallest
        ratio among the real held-out images: how close fresh walks come).
    """
    train_x = flatten_pixels(train)
    real_d, _ = nearest(flatten_pixels(heldout), train_x)
    gen_d, index = nearest(flatten_pixels(generated), train_x)
    median = float(np.median(real_d))
    ratio = gen_d / max(median, 1e-12)
    return {"ratio": ratio, "train_index": index, "flagged": np.flatnonzero(ratio < threshold),
            "real_median": median, "real_min_ratio": float(real_d.min() / max(median, 1e-12))}
