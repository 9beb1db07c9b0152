"""The 3D conv folded into a 2D conv over its time taps (soraax/conv.py) is the 3D conv: values, gradients, strides."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from soraax import conv

LAYOUT = ("NDHWC", "DHWIO", "NDHWC")


def _native(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=LAYOUT)


def _split(x, w, strides, padding):
    return conv.time_split_conv(x, w, strides, padding, dimension_numbers=LAYOUT)


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1))),
    ((3, 3, 3), (2, 2, 2), ((0, 0), (0, 1), (0, 1))),
    ((3, 1, 1), (2, 1, 1), ((0, 0), (0, 0), (0, 0))),
    ((1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1))),
    ((1, 1, 1), (1, 1, 1), ((0, 0), (0, 0), (0, 0))),
])
def test_split_equals_native_conv_and_its_gradient(kernel, strides, padding):
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (2, 7, 9, 10, 5))
    w = jax.random.normal(kw, (*kernel, 5, 6))
    assert conv.splits_time(x, w, padding, None, None, LAYOUT, 1)
    np.testing.assert_allclose(_split(x, w, strides, padding), _native(x, w, strides, padding), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, strides, padding)))
    for got, want in zip(jax.grad(loss(_split), (0, 1))(x, w), jax.grad(loss(_native), (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_native_conv_where_the_split_does_not_apply():
    x = jnp.ones((1, 5, 6, 6, 4))
    w = jnp.ones((3, 3, 3, 4, 4))
    # Time padding inside the conv, wide channels, dilation: each falls back to the 3D conv.
    assert not conv.splits_time(x, w, ((1, 1), (1, 1), (1, 1)), None, None, LAYOUT, 1)
    wide = jnp.ones((3, 3, 3, 4, conv.MAX_SPLIT_CHANNELS + 1))
    assert not conv.splits_time(x, wide, ((0, 0), (1, 1), (1, 1)), None, None, LAYOUT, 1)
    assert not conv.splits_time(x, w, ((0, 0), (1, 1), (1, 1)), None, (2, 1, 1), LAYOUT, 1)
    padded = ((1, 1), (1, 1), (1, 1))
    np.testing.assert_array_equal(conv.time_split_conv(x, w, (1, 1, 1), padded, dimension_numbers=LAYOUT),
                                  _native(x, w, (1, 1, 1), padded))
