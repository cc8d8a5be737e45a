"""The ops seam (being moved here from models/fastmath.py): the backend a pipeline picks once."""

import contextlib

import mlx.core as mx


class _Layout:
    def prepare(self, module):
        """This device's weight layout (CPU fp32: stored for plain BLAS products)."""
        from ..models.layers import store_linear_weights_transposed

        if mx.default_device() == mx.cpu and module.dtype == mx.float32:
            store_linear_weights_transposed(module)


def for_device(device=None):
    return _Layout()


@contextlib.contextmanager
def use(backend):
    yield backend
