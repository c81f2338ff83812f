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
records the parameters and the file's sha256. The file is generated and written ``CHUNK_ROWS``
rows at a time (``write_npz``), so a million samples need no more memory than a hundred
thousand for x; the values and bytes are those of drawing everything at once.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from numpy.lib import format as npy_format

from pipeline.data.base import READERS, Reader, Samples, Scan, check_recorded_files
from pipeline.data.views import ViewSpec
from pipeline.errors import UserError
from pipeline.files import atomic_path, file_sha256
from pipeline.manifest import Manifest, SplitRows

FILE_NAME = "synthetic.npz"
SPLIT_FRACTIONS = (("train", 0.05), ("val", 0.05), ("test", 0.90))
CHUNK_ROWS = 100_000  # rows generated and written at a time: bounds the float64 temporaries (~25 MB at d=30)


def generate(*, num_samples: int, dim: int, num_classes: int, sigma2: float, seed: int) -> dict[str, np.ndarray]:
    """x, y, means, posterior as described in the module docstring, all in memory (see ``write_npz``)."""
    means, y, chunks = _draws(num_samples=num_samples, dim=dim, num_classes=num_classes, sigma2=sigma2, seed=seed)
    xs, posts = zip(*chunks)
    return {"x": np.concatenate(xs), "y": y, "means": means, "posterior": np.concatenate(posts)}


def _draws(*, num_samples: int, dim: int, num_classes: int, sigma2: float, seed: int,
           chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """means, y, and the (x, posterior) row chunks, in order.

    The draws are those of one ``rng.normal(size=(N, d))`` call: the Generator's normal sampler
    keeps no state between calls, so consecutive row chunks continue the same stream and give
    the same values (y is drawn whole: the bounded-integer sampler buffers 32-bit halves within
    one call, so splitting it would shift the stream; it is only N int32s).
    """
    rng = np.random.default_rng(seed)
    means = rng.integers(-1, 2, size=(num_classes, dim)).astype(np.float32)
    y = rng.integers(0, num_classes, size=num_samples).astype(np.int32)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, num_samples, chunk_rows):
            rows = y[start:start + chunk_rows]
            noise = rng.normal(0.0, np.sqrt(sigma2), size=(len(rows), dim))
            x = (means[rows] + noise).astype(np.float32)
            yield x, posterior_of(x, means, sigma2=sigma2)

    return means, y, chunks()


def write_npz(path: str | Path, *, num_samples: int, dim: int, num_classes: int, sigma2: float,
              seed: int, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Generate and write ``path`` chunk by chunk (the bytes ``np.savez(path, **generate(...))`` writes,
    without holding x in memory); returns y. The posterior, N x K, is kept until x is written."""
    means, y, chunks = _draws(num_samples=num_samples, dim=dim, num_classes=num_classes, sigma2=sigma2,
                              seed=seed, chunk_rows=chunk_rows)
    posterior = np.empty((num_samples, num_classes), dtype=np.float32)
    # The layout of np.savez: stored (uncompressed) members x, y, means, posterior, zip64 forced,
    # each a version 1.0 .npy header then the C-order data.
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            npy_format.write_array_header_1_0(fh, {"descr": npy_format.dtype_to_descr(np.dtype(np.float32)),
                                                   "fortran_order": False, "shape": (num_samples, dim)})
            start = 0
            for x, post in chunks:
                fh.write(x.tobytes("C"))
                posterior[start:start + len(x)] = post
                start += len(x)
        for name, value in (("y", y), ("means", means), ("posterior", posterior)):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                npy_format.write_array(fh, value, allow_pickle=False)
    return y


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
        path = root / FILE_NAME
        try:
            with atomic_path(path, suffix=".npz") as tmp:
                y = write_npz(tmp, num_samples=n, dim=d, num_classes=k, sigma2=sigma2, seed=seed)
        except OSError as err:
            raise UserError(f"{path}: cannot write the synthetic data ({err.strerror or err})") from None
        meta = {"num_samples": n, "dim": d, "num_classes": k, "sigma2": sigma2, "seed": int(seed),
                "split_fractions": dict(SPLIT_FRACTIONS), "file": FILE_NAME,
                "files": {FILE_NAME: file_sha256(path)}}
        return Scan(
            sample_id=np.arange(n, dtype=np.int64),
            label=y,
            split=_split_column(n),
            source=np.asarray([str(i) for i in range(n)], dtype=object),
            class_names=tuple(f"class_{i}" for i in range(k)),
            splits=tuple(name for name, _ in SPLIT_FRACTIONS),
            meta=meta,
        )

    def load(self, manifest: Manifest, rows: SplitRows) -> Samples:
        data = load_arrays(manifest)
        index = _row_index(manifest, rows, count=len(data["x"]))
        return Samples(kind="vector", native_shape=(data["x"].shape[1],), array=data["x"][index])

    def check_files(self, manifest: Manifest, *, contents: bool = False) -> None:
        """The data file is the one the manifest was built with, has the manifest's classes, and holds
        every row the manifest's ``source`` names."""
        data = load_arrays(manifest)
        for split in manifest.splits:
            _row_index(manifest, manifest.split(split), count=len(data["x"]))

    def default_views(self, manifest: Manifest, *, seed: int = 0) -> ViewSpec:
        return ViewSpec("identity", seed=seed)


def load_arrays(manifest: Manifest) -> dict[str, np.ndarray]:
    """The stored arrays, after checking the file is the one the manifest was built with and has the
    manifest's number of classes."""
    if manifest.dataset != "synthetic":
        raise UserError(f"{manifest.path}: field 'dataset' is {manifest.dataset!r}, expected 'synthetic'")
    name = manifest.meta.get("file", FILE_NAME)
    check_recorded_files(manifest, [name])
    with np.load(Path(manifest.root) / name) as f:
        data = {key: f[key] for key in f.files}
    classes = data["posterior"].shape[1]
    if classes != manifest.num_classes:
        raise UserError(f"{manifest.path}: field 'class_names': expected {classes} names (the classes of "
                        f"{Path(manifest.root) / name}), found {manifest.num_classes}")
    return data


def _row_index(manifest: Manifest, rows: SplitRows, *, count: int) -> np.ndarray:
    """The data-file rows of ``rows`` (their ``source``), each checked to lie in [0, count)."""
    try:
        index = np.asarray([int(s) for s in rows.source], dtype=np.int64)
    except (ValueError, OverflowError):
        raise UserError(f"{manifest.path}: column 'source' of a synthetic manifest must hold row indices") from None
    bad = np.flatnonzero((index < 0) | (index >= count))
    if len(bad):
        raise UserError(f"{manifest.path}: column 'source' value {rows.source[bad[0]]!r} (split {rows.name!r}): "
                        f"expected a row index in [0, {count}) of the synthetic data file")
    return index


def bayes_posterior(manifest: Manifest, split: str) -> np.ndarray:
    """Exact p*(y | x) for the rows of ``split`` in manifest order: float32 [N, K]."""
    rows = manifest.split(split)
    posterior = load_arrays(manifest)["posterior"]
    return posterior[_row_index(manifest, rows, count=len(posterior))]
