"""The MIL ops a Core ML program computes at run time, in numpy, for ``coreml_interpreter``.

Each op is written from its definition in coremltools 9.0
(``coremltools/converters/mil/mil/ops/defs/iOS15..iOS18``): same inputs, same defaults (an
``inverse`` without ``epsilon`` adds 1e-4, an ``rsqrt`` 1e-12), same results as the op's
``value_inference`` there (tests/test_coreml_interpreter.py checks each against it).

What an op receives: numpy arrays (float values as float32 or float16, integers, bools), and
its constant parameters (an axis, a mask, a dtype name) as numpy scalars, arrays or strings.
``OPS[type].compute`` returns the op's output, or a tuple of them, in whatever float width
numpy gives: the interpreter rounds each output to the dtype the program declares for it.
``moves`` marks an op that only moves or selects values (reshape, concat, gather...): its
output holds its inputs' values unchanged, so there is nothing to round.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Op:
    compute: Callable
    moves: bool = False  # the output is a rearrangement of the inputs' values: no arithmetic
    wants_shape: bool = False  # compute(out_shapes, **inputs): the program's declared output shapes
    tuples: tuple = ()  # arguments bound to a tuple of values (concat's), a list even when it holds one


def _axes(axes):
    return None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))


def _flag(value, default=False):
    return default if value is None else bool(value)


def inverse(x, epsilon=1e-4):
    return np.reciprocal(x + epsilon)


def rsqrt(x, epsilon=1e-12):
    return 1.0 / np.sqrt(x + epsilon)


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def relu(x):
    return np.maximum(x, 0)


def softmax(x, axis=-1):
    shifted = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return shifted / shifted.sum(axis=int(axis), keepdims=True)


def clip(x, alpha, beta):
    return np.minimum(np.maximum(x, alpha), beta)


def select(cond, a, b):
    return np.where(cond, a, b)


def cast(x, dtype):
    """The conversion itself is the interpreter's rounding to the declared output dtype (``astype``:
    floats to integers truncate toward zero, as the op's value_inference does)."""
    return x


def _reduce(function):
    def reduce(x, axes=None, keep_dims=False):
        return function(x, axis=_axes(axes), keepdims=_flag(keep_dims))
    return reduce


def matmul(x, y, transpose_x=False, transpose_y=False):
    if _flag(transpose_x) and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if _flag(transpose_y) and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    if y.ndim == 2 and x.ndim > 2:  # a weight: one 2-D product (numpy's stacked matmul skips BLAS here)
        return (x.reshape(-1, x.shape[-1]) @ y).reshape(*x.shape[:-1], y.shape[-1])
    return np.matmul(x, y)


def linear(x, weight, bias=None):
    out = matmul(x, weight, transpose_y=True)
    return out if bias is None else out + bias


def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise NotImplementedError(f"gather with batch_dims={int(batch_dims)} (only 0 is implemented)")
    return np.take(x, indices.astype(np.int64), axis=int(axis), mode="raise")


def concat(values, axis, interleave=False):
    axis = int(axis)
    if _flag(interleave):
        stacked = np.stack(values, axis=axis + 1 if axis >= 0 else axis)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def stack(values, axis):
    return np.stack(values, axis=int(axis))


def reshape(out_shapes, x, shape):
    declared = out_shapes[0]
    if None not in declared:
        return x.reshape(declared)
    target = [x.shape[i] if int(s) == 0 and len(shape) == x.ndim else int(s) for i, s in enumerate(shape)]
    return x.reshape(target)


def expand_dims(x, axes):
    return np.expand_dims(x, axis=_axes(axes))


def squeeze(x, axes=None):
    return np.squeeze(x, axis=_axes(axes))


def transpose(x, perm):
    return np.transpose(x, _axes(perm))


def tile(x, reps):
    return np.tile(x, _axes(reps))


def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    rank = x.ndim
    stride = np.ones(rank, np.int64) if stride is None else stride
    begin_mask, end_mask, squeeze_mask = (np.zeros(rank, bool) if m is None else m
                                          for m in (begin_mask, end_mask, squeeze_mask))
    index = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(int(begin[i]))
            continue
        start = None if begin_mask[i] else int(begin[i])
        stop = None if end_mask[i] else int(end[i])
        index.append(slice(start, stop, int(stride[i])))
    return x[tuple(index)]


def slice_by_size(x, begin, size):
    index = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))
    return x[index]


def split(x, axis, num_splits=None, split_sizes=None):
    if split_sizes is not None:
        return tuple(np.split(x, np.cumsum(split_sizes)[:-1], axis=int(axis)))
    return tuple(np.split(x, int(num_splits), axis=int(axis)))


def _binary(function):
    return lambda x, y: function(x, y)


def _unary(function):
    return lambda x: function(x)


_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide, "pow": np.power,
           "floor_div": np.floor_divide, "mod": np.mod, "minimum": np.minimum, "maximum": np.maximum,
           "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
           "greater": np.greater, "greater_equal": np.greater_equal, "logical_and": np.logical_and,
           "logical_or": np.logical_or}
_UNARY = {"abs": np.abs, "exp": np.exp, "sqrt": np.sqrt, "square": np.square, "sin": np.sin, "cos": np.cos,
          "tanh": np.tanh, "floor": np.floor, "ceil": np.ceil, "logical_not": np.logical_not}
_COMPUTE = {
    **{name: _binary(f) for name, f in _BINARY.items()}, **{name: _unary(f) for name, f in _UNARY.items()},
    "rsqrt": rsqrt, "inverse": inverse, "silu": silu, "sigmoid": sigmoid, "relu": relu, "clip": clip,
    "select": select, "cast": cast, "reduce_max": _reduce(np.max), "reduce_min": _reduce(np.min),
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum), "softmax": softmax, "matmul": matmul,
    "linear": linear,
}
_MOVES = {
    "gather": gather, "expand_dims": expand_dims, "squeeze": squeeze,
    "transpose": transpose, "tile": tile, "slice_by_index": slice_by_index, "slice_by_size": slice_by_size,
    "split": split,
}

# op type -> Op: every run-time op the interpreter knows.
OPS = {**{name: Op(f) for name, f in _COMPUTE.items()},
       **{name: Op(f, moves=True) for name, f in _MOVES.items()},
       "concat": Op(concat, moves=True, tuples=("values",)), "stack": Op(stack, moves=True, tuples=("values",)),
       "reshape": Op(reshape, moves=True, wants_shape=True)}
