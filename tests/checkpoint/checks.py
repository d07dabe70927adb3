"""Assertions shared by the checkpoint reader tests."""

import pytest
import torch

from ane_build.util.errors import UserError


def assert_same_weights(got, want):
    """Same names, dtypes and bits."""
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def one_line_error(fn, *args):
    """The message of the UserError ``fn(*args)`` raises, checked to be a single line."""
    with pytest.raises(UserError) as raised:
        fn(*args)
    message = str(raised.value)
    assert "\n" not in message
    return message
