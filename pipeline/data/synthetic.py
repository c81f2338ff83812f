"""The synthetic Gaussian-mixture dataset with an exact Bayes posterior (docs/methods.md, "The synthetic dataset").

``y ~ Uniform{0..K-1}``, ``x = mu_y + eps``, ``eps ~ N(0, sigma2 I_d)``, ``mu_y in {-1, 0, 1}^d``,
everything drawn from ``numpy.random.default_rng(seed)``. Defaults K=3, d=30, sigma2=6,
100 000 samples; rows [0, 5%) are train, [5%, 10%) val, the rest test (samples are i.i.d.,
so contiguous blocks are as random as any split).

    kdcache manifest build --dataset synthetic --root data/synthetic --out data_manifests/synthetic.parquet
    from pipeline.data.synthetic import bayes_posterior
    p_star = bayes_posterior(manifest, "test")        # float32 [N, K], rows in manifest order

``root/synthetic.npz`` holds x [N, d] float32, y [N] int32, means [K, d] float32 and
posterior [N, K] float32 = softmax_y(-||x - mu_y||^2 / (2 sigma2)) computed in float64 from
the stored float32 x. The manifest's ``source`` is the row index into these arrays; its meta
records the parameters and the file's sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.data.base import READERS, Reader, Samples, Scan, check_recorded_files
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.files import atomic_path, file_sha256
from pipeline.manifest import Manifest, SplitRows

FILE_NAME = "synthetic.npz"
SPLIT_FRACTIONS = (("train", 0.05), ("val", 0.05), ("test", 0.90))


def generate(*, num_samples: int, dim: int, num_classes: int, sigma2: float, seed: int) -> dict[str, np.ndarray]:
    """x, y, means, posterior as described in the module docstring."""
    rng = np.random.default_rng(seed)
    means = rng.integers(-1, 2, size=(num_classes, dim)).astype(np.float32)
    y = rng.integers(0, num_classes, size=num_samples).astype(np.int32)
    noise = rng.normal(0.0, np.sqrt(sigma2), size=(num_samples, dim))
    x = (means[y] + noise).astype(np.float32)
    return {"x": x, "y": y, "means": means, "posterior": posterior_of(x, means, sigma2=sigma2)}


def posterior_of(x: np.ndarray, means: np.ndarray, *, sigma2: float) -> np.ndarray:
    """Exact Bayes posterior under equal priors, float32 [N, K] (computed in float64)."""
    x64, m64 = x.astype(np.float64), means.astype(np.float64)
    sq = (x64 * x64).sum(1, keepdims=True) - 2 * x64 @ m64.T + (m64 * m64).sum(1)
    logits = -sq / (2 * sigma2)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def _split_column(n: int) -> np.ndarray:
    split = np.empty(n, dtype=object)
    start = 0
    for i, (name, frac) in enumerate(SPLIT_FRACTIONS):
        stop = n if i == len(SPLIT_FRACTIONS) - 1 else start + int(round(frac * n))
        split[start:stop] = name
        start = stop
    return split


@READERS.register("synthetic")
class SyntheticReader(Reader):
    name = "synthetic"
    options = {"num_samples": 100_000, "dim": 30, "num_classes": 3, "sigma2": 6.0}

    def scan(self, root: Path, *, classes: Sequence[str] | None, seed: int, progress: bool = False,
             **options: Any) -> Scan:
        opts = self.resolve_options(options)
        n, d, k, sigma2 = int(opts["num_samples"]), int(opts["dim"]), int(opts["num_classes"]), float(opts["sigma2"])
        if n < 20 or d < 1 or k < 2 or not sigma2 > 0:
            raise UserError(f"dataset 'synthetic': expected num_samples >= 20, dim >= 1, num_classes >= 2, "
                            f"sigma2 > 0; found {n}, {d}, {k}, {sigma2}")
        if classes is not None:
            raise UserError("dataset 'synthetic': --classes does not apply (use --num-classes)")
        if seed < 0:
            raise UserError(f"option 'seed': expected an integer >= 0, found {seed}")
        data = generate(num_samples=n, dim=d, num_classes=k, sigma2=sigma2, seed=seed)
        path = root / FILE_NAME
        try:
            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, **data)
        except OSError as err:
            raise UserError(f"{path}: cannot write the synthetic data ({err.strerror or err})") from None
        meta = {"num_samples": n, "dim": d, "num_classes": k, "sigma2": sigma2, "seed": int(seed),
                "split_fractions": dict(SPLIT_FRACTIONS), "file": FILE_NAME,
                "files": {FILE_NAME: file_sha256(path)}}
        return Scan(
            sample_id=np.arange(n, dtype=np.int64),
            label=data["y"],
            split=_split_column(n),
            source=np.asarray([str(i) for i in range(n)], dtype=object),
            class_names=tuple(f"class_{i}" for i in range(k)),
            splits=tuple(name for name, _ in SPLIT_FRACTIONS),
            meta=meta,
        )

    def load(self, manifest: Manifest, rows: SplitRows) -> Samples:
        data = load_arrays(manifest)
        index = _row_index(manifest, rows)
        return Samples(kind="vector", native_shape=(data["x"].shape[1],), array=data["x"][index])

    def default_views(self, manifest: Manifest, *, seed: int = 0) -> ViewSpec:
        return ViewSpec("identity", seed=seed)


def load_arrays(manifest: Manifest) -> dict[str, np.ndarray]:
    """The stored arrays, after checking the file is the one the manifest was built with."""
    if manifest.dataset != "synthetic":
        raise UserError(f"{manifest.path}: field 'dataset' is {manifest.dataset!r}, expected 'synthetic'")
    name = manifest.meta.get("file", FILE_NAME)
    check_recorded_files(manifest, [name])
    with np.load(Path(manifest.root) / name) as f:
        return {key: f[key] for key in f.files}


def _row_index(manifest: Manifest, rows: SplitRows) -> np.ndarray:
    try:
        return np.asarray([int(s) for s in rows.source], dtype=np.int64)
    except ValueError:
        raise UserError(f"{manifest.path}: column 'source' of a synthetic manifest must hold row indices") from None


def bayes_posterior(manifest: Manifest, split: str) -> np.ndarray:
    """Exact p*(y | x) for the rows of ``split`` in manifest order: float32 [N, K]."""
    rows = manifest.split(split)
    return load_arrays(manifest)["posterior"][_row_index(manifest, rows)]
