import os

# Tests run on the CPU even where a GPU is present, so numbers match CI.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI turns on the persistent compile cache in the user's cache folder;
# tests stay off it (tests/test_compilation.py turns it on in temporary folders).
os.environ["JAXLEAK_COMPILE_CACHE"] = "off"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    from jaxleak import data

    return data.load("digits")
