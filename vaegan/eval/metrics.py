"""FID, KID and precision/recall on Inception features (numpy, float64)."""
from collections import namedtuple

import numpy as np

# std: over the subsets; None where there is one subset (nothing to spread: never a fake 0)
KID = namedtuple("KID", "mean std subsets subset_size")


def gaussian_statistics(features):
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def trace_sqrt_product(sigma1, sigma2):
    """Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): the second form is symmetric, so two
    symmetric eigendecompositions replace a general matrix square root (faster, and stable
    for the singular covariances of small sets)."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eigenvalues = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def kernel_inception_distance(real, fake, subsets=10, subset_size=1000, seed=0):
    """KID: the unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over random subsets.

    Returns KID(mean, std over subsets, subsets, subset size). A subset as large as both sets is
    the same set every time: one subset is computed then, and std is None."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    d = real.shape[1]
    m = min(subset_size, len(real), len(fake))
    if m == len(real) == len(fake):
        subsets = 1
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return KID(float(np.mean(values)), float(np.std(values)) if subsets > 1 else None, subsets, m)


def _kth_neighbour_radii(features, k):
    distances = np.linalg.norm(features[:, None, :] - features[None, :, :], axis=2)
    return np.sort(distances, axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of fakes inside the real
    manifold (balls to each real point's k-th neighbour), and of reals inside the fake manifold."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    k = min(k, len(real) - 1, len(fake) - 1)

    def coverage(support, queries):
        radii = _kth_neighbour_radii(support, k)
        distances = np.linalg.norm(queries[:, None, :] - support[None, :, :], axis=2)
        return float((distances <= radii[None, :]).any(axis=1).mean())
    return coverage(real, fake), coverage(fake, real)
