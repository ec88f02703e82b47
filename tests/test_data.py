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
