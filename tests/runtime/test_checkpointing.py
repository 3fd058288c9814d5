import pytest
import torch

from chronicals_compile.runtime import enable_activation_checkpointing
from chronicals_compile.testing import tiny_model


def test_turns_checkpointing_on_without_the_deprecation_warning(recwarn):
    model = tiny_model("llama")
    enable_activation_checkpointing(model)
    on = getattr(model, "is_activation_checkpointing", None)
    assert (on if on is not None else model.is_gradient_checkpointing) is True
    assert not [w for w in recwarn if "deprecated" in str(w.message)]


def test_falls_back_to_the_old_name():
    calls = []

    class OldModel:
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(gradient_checkpointing_kwargs)

    enable_activation_checkpointing(OldModel())
    assert calls == [{"use_reentrant": False}]


def test_a_model_without_checkpointing_is_named():
    with pytest.raises(TypeError, match="Linear supports no activation checkpointing"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))
