"""The Flax model zoo.

Every model is a Linen module that takes a batch ``x`` of shape (B, H, W, C)
and returns logits (B, num_classes). Models adapt to their input: pooling and
striding stop once the feature map is 1x1, so the same architecture runs on
8x8 digits, 28x28 MNIST, 32x32x3 CIFAR and 64x64 faces.

Per-example gradients must be well defined, so no layer couples the examples
of a batch: the ResNets use GroupNorm, never BatchNorm in training mode.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxleak.errors import InputError, UnknownNameError

_ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
}


def _activation(name: str) -> Callable:
    if name not in _ACTIVATIONS:
        raise UnknownNameError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]


def _pool(x: jax.Array) -> jax.Array:
    """2x2 max pooling, skipped once the feature map is 1 pixel high or wide."""
    if x.shape[-3] < 2 or x.shape[-2] < 2:
        return x
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def _stride(x: jax.Array) -> int:
    return 2 if min(x.shape[-3], x.shape[-2]) >= 2 else 1


class MLP(nn.Module):
    """Fully connected network on the flattened image."""

    num_classes: int
    hidden: Sequence[int] = (128, 64)
    activation: str = "relu"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        act = _activation(self.activation)
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = act(nn.Dense(width)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class LeNet(nn.Module):
    """LeNet-5 style: two 5x5 convolutions with pooling, then three dense layers."""

    num_classes: int
    activation: str = "relu"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        act = _activation(self.activation)
        x = _pool(act(nn.Conv(6, (5, 5), padding="SAME")(x)))
        x = _pool(act(nn.Conv(16, (5, 5), padding="SAME")(x)))
        x = x.reshape((x.shape[0], -1))
        for width in (120, 84):
            x = act(nn.Dense(width)(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class AlexNet(nn.Module):
    """AlexNet sized for CIFAR: five 3x3 convolutions, three pools, three dense layers."""

    num_classes: int
    activation: str = "relu"
    dropout: float = 0.0
    widths: Sequence[int] = (64, 192, 384, 256, 256)
    fc: Sequence[int] = (1024, 512)

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        act = _activation(self.activation)
        for i, width in enumerate(self.widths):
            x = act(nn.Conv(width, (3, 3), padding="SAME")(x))
            if i in (0, 1, 4):
                x = _pool(x)
        x = x.reshape((x.shape[0], -1))
        for width in self.fc:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = act(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


_VGG_CFG = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG for CIFAR-sized inputs: 3x3 convolutions, then two dense layers of 512."""

    num_classes: int
    config: str = "vgg16"
    activation: str = "relu"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        act = _activation(self.activation)
        for item in _VGG_CFG[self.config]:
            x = _pool(x) if item == "M" else act(nn.Conv(item, (3, 3), padding="SAME")(x))
        x = x.reshape((x.shape[0], -1))
        for _ in range(2):
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            x = act(nn.Dense(512)(x))
        return nn.Dense(self.num_classes)(x)


def _groups(channels: int) -> int:
    return max(1, min(32, channels // 4))


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm (per-example normalisation)."""

    width: int
    stride: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        act = _activation(self.activation)
        y = nn.Conv(self.width, (3, 3), strides=self.stride, padding="SAME", use_bias=False)(x)
        y = act(nn.GroupNorm(num_groups=_groups(self.width))(y))
        y = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False)(y)
        y = nn.GroupNorm(num_groups=_groups(self.width))(y)
        if self.stride != 1 or x.shape[-1] != self.width:
            x = nn.Conv(self.width, (1, 1), strides=self.stride, use_bias=False, name="shortcut")(x)
            x = nn.GroupNorm(num_groups=_groups(self.width), name="shortcut_norm")(x)
        return act(x + y)


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem, basic blocks, global average pooling)."""

    num_classes: int
    stages: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    activation: str = "relu"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        act = _activation(self.activation)
        x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False)(x)
        x = act(nn.GroupNorm(num_groups=_groups(self.widths[0]))(x))
        for stage, (blocks, width) in enumerate(zip(self.stages, self.widths)):
            for b in range(blocks):
                stride = _stride(x) if (stage > 0 and b == 0) else 1
                x = BasicBlock(width, stride, self.activation)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


_ZOO: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda c, **kw: MLP(c, **kw),
    "lenet": lambda c, **kw: LeNet(c, **kw),
    "alexnet": lambda c, **kw: AlexNet(c, **kw),
    "vgg11": lambda c, **kw: VGG(c, config="vgg11", **kw),
    "vgg16": lambda c, **kw: VGG(c, config="vgg16", **kw),
    "resnet18": lambda c, **kw: ResNet(c, stages=(2, 2, 2, 2), widths=(64, 128, 256, 512), **kw),
    "resnet20": lambda c, **kw: ResNet(c, stages=(3, 3, 3), widths=(16, 32, 64), **kw),
}


def names() -> list[str]:
    """Names of the models in the zoo, smallest first."""
    return list(_ZOO)


def get(name: str, num_classes: int, input_shape: Sequence[int] | None = None, **options) -> nn.Module:
    """Build a zoo model.

    Args:
      name: one of :func:`names`.
      num_classes: number of task classes (output width).
      input_shape: (H, W, C) of one example; checked for rank only, the model
        adapts to it when it is initialised.
      **options: ``activation`` ('relu', 'tanh', 'sigmoid', 'gelu') and
        ``dropout`` (rate, active only when called with ``train=True``).
    """
    if name not in _ZOO:
        raise UnknownNameError(f"unknown model {name!r}; choose one of {names()}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if input_shape is not None and len(tuple(input_shape)) != 3:
        raise InputError(
            f"input_shape must be (height, width, channels), got {tuple(input_shape)}"
        )
    return _ZOO[name](num_classes, **options)
