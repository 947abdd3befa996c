"""Distribution metrics on feature vectors and pixels.

Short functions of numpy arrays, so each can be checked on inputs whose answer
is known. Features are the reference classifier's embeddings ``(N, D)``.
"""

import warnings

import numpy as np


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to ``a (N, D)`` and ``b (M, D)``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. 0 for equal statistics."""
    import scipy.linalg  # a quarter of a second: loaded only by the scripts that measure FD

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


def nearest_two(queries, references):
    """Distances ``(N, 2)`` of each query to its nearest and second-nearest
    reference row, and the nearest one's index ``(N,)``."""
    d = pairwise_distances(queries, references)
    if d.shape[1] < 2:
        raise ValueError("nearest_two needs at least two reference rows")
    two = np.partition(d, 1, axis=1)[:, :2]
    return two, d.argmin(axis=1)


def memorisation_by_second_nearest(generated, train, threshold=1 / 3):
    """The memorisation test of Gu et al. (TMLR 2025): a sample is a copy when
    its nearest training image is much closer than the second nearest,
    ``d1 / d2 < threshold``.

    Unlike a threshold on ``d1`` alone it needs no reference distance: a new
    walk sits about as far from its nearest training walk as from the next,
    while a reproduction sits next to one of them only. Distances are RMS
    pixel differences of uint8 ``(N, C, H, W)`` images.

    :return: dict with ``ratio (N,)`` (0 for an exact copy), ``train_index
        (N,)`` and ``flagged`` (indices with ratio below ``threshold``).
    """
    two, index = nearest_two(flatten_pixels(generated), flatten_pixels(train))
    # Two identical training images both at distance 0 still make an exact copy.
    ratio = np.where(two[:, 0] == 0, 0.0, two[:, 0] / np.maximum(two[:, 1], 1e-12))
    return {"ratio": ratio, "train_index": index, "flagged": np.flatnonzero(ratio < threshold)}


def nearest_neighbour_distances(x):
    """Distance of each row of ``x (N, D)`` to its nearest other row ``(N,)``."""
    return knn_radii(x, 1)


def within_class_variety(generated, generated_labels, real, real_labels, rng, repeats=5):
    """How varied the samples of one class are, against real images of it.

    For every class with at least two images in both sets, equal numbers
    ``n = min(generated, real)`` are drawn from each (``repeats`` times) and
    each image's distance to its nearest neighbour within its own draw is
    taken (RMS pixel differences). Copies of one another or of a few modes
    sit close together; a set as varied as the real walks gives ratio ~1.

    :return: dict ``ratio`` (median generated / median real distance),
        ``generated`` and ``real`` (the two medians), ``classes`` (how many
        classes counted), or None when no class has two images in both sets.
    """
    generated_x, real_x = flatten_pixels(generated), flatten_pixels(real)
    gen_d, real_d, classes = [], [], 0
    for c in np.intersect1d(np.unique(generated_labels), np.unique(real_labels)):
        gen_rows, real_rows = np.flatnonzero(generated_labels == c), np.flatnonzero(real_labels == c)
        n = min(len(gen_rows), len(real_rows))
        if n < 2:
            continue
        classes += 1
        for _ in range(repeats):
            gen_d.append(nearest_neighbour_distances(generated_x[rng.choice(gen_rows, n, replace=False)]))
            real_d.append(nearest_neighbour_distances(real_x[rng.choice(real_rows, n, replace=False)]))
    if not classes:
        return None
    gen_median, real_median = float(np.median(np.concatenate(gen_d))), float(np.median(np.concatenate(real_d)))
    return {"ratio": gen_median / max(real_median, 1e-12), "generated": gen_median, "real": real_median,
            "classes": classes}


def spread(values):
    """``{"mean", "std", "values"}`` of repeated measurements (std: sample
    standard deviation, 0 for one value)."""
    values = [float(v) for v in values]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "values": values}
