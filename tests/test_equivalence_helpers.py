"""The shared end-to-end check the GPU tests lean on (``assert_compiled_half_step_matches_float64``),
run here on CPU so that it is itself tested: it passes on a right compile, and it refuses a compile
that did not swap what it was told to expect."""
import pytest
import torch

from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import assert_compiled_half_step_matches_float64


def test_half_step_against_float64_passes_and_checks_the_swaps():
    base = tiny_model("qwen2", layers=1, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=128)
    batch = random_batch(seq=16, vocab=128)
    assert_compiled_half_step_matches_float64(base, batch, swaps={"linear_cross_entropy": 1},
                                              options={"compiler": "aot_eager"})
    with pytest.raises(AssertionError, match="rms_norm"):
        assert_compiled_half_step_matches_float64(base, batch, swaps={"rms_norm": 99},
                                                  options={"compiler": "aot_eager"})
