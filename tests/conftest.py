import os

# Tests run on the CPU even where a GPU is present, so numbers match CI.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    from jaxleak import data

    return data.load("digits")
