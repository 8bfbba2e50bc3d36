"""The orbax-saved GGUF conversion: bitwise the GGUF's blocks, reused, and refused when it is of another model."""

import numpy as np
import pytest

from vorch_jax.models import converted
from vorch_jax.models.converted import ConversionMismatchError, ConvertedSource, load_converted


@pytest.fixture(scope="module")
def conversion(smollm2_source, tmp_path_factory):
    d = tmp_path_factory.mktemp("converted")
    return d, load_converted(smollm2_source, d)


@pytest.mark.parametrize("block", ["embed", "layers.0.attn", "layers.29.mlp", "final_norm"])
def test_blocks_are_bitwise_the_gguf_blocks(conversion, smollm2_source, block):
    _, src = conversion
    got, want = src(block), smollm2_source(block)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_second_load_reuses_the_saved_conversion(conversion, smollm2_source, monkeypatch):
    d, _ = conversion
    monkeypatch.setattr(converted, "convert", lambda *a, **k: pytest.fail("converted again"))
    assert isinstance(load_converted(smollm2_source, d), ConvertedSource)


def test_conversion_of_another_model_file_is_refused(conversion, smollm2_source, monkeypatch):
    d, _ = conversion
    monkeypatch.setattr(converted, "model_file_key", lambda source: "0123456789abcdef")
    with pytest.raises(ConversionMismatchError, match="another model file"):
        ConvertedSource(smollm2_source, d)


def test_unknown_block_names_it(conversion):
    _, src = conversion
    with pytest.raises(KeyError, match="layers.99.attn"):
        src("layers.99.attn")
