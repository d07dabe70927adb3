"""ctypes bindings of ane_runner.h, for tests and benchmarks (an app links the C ABI directly)."""

import ctypes
import enum


class Status(enum.IntEnum):  # ane_runner_status
    OK = 0
    STOPPED = 1
    INVALID_ARGUMENT = -1
    CONTEXT_FULL = -2
    NO_LOGITS = -3
    EXECUTION_FAILED = -4


class Info(ctypes.Structure):  # ane_runner_info
    _fields_ = [(name, ctypes.c_int32) for name in
                ("seq_length", "cache_len", "max_seq_length", "vocab_size", "n_layers", "dtype_bits", "position")]


class Sampling(ctypes.Structure):  # ane_runner_sampling
    _fields_ = [("temperature", ctypes.c_float), ("top_p", ctypes.c_float), ("seed", ctypes.c_uint64)]


_IDS = ctypes.POINTER(ctypes.c_int32)
_SIGNATURES = {  # name: (result, argument types)
    "ane_runner_open": (ctypes.c_void_p, [ctypes.c_char_p]),
    "ane_runner_close": (None, [ctypes.c_void_p]),
    "ane_runner_last_error": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ane_runner_get_info": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(Info)]),
    "ane_runner_prefill": (ctypes.c_int, [ctypes.c_void_p, _IDS, ctypes.c_size_t]),
    "ane_runner_next": (ctypes.c_int, [ctypes.c_void_p, _IDS]),
    "ane_runner_set_sampling": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(Sampling)]),
    "ane_runner_set_stop_ids": (ctypes.c_int, [ctypes.c_void_p, _IDS, ctypes.c_size_t]),
    "ane_runner_get_stop_ids": (ctypes.c_size_t, [ctypes.c_void_p, _IDS, ctypes.c_size_t]),
    "ane_runner_logits": (ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p]),
    "ane_runner_reset": (None, [ctypes.c_void_p]),
}


def load(library_path):
    """The shared library with its functions' signatures declared."""
    lib = ctypes.CDLL(str(library_path))
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


class OpenError(RuntimeError):
    pass


class Runner:
    """One ane_runner handle. Calls return a Status; ``error`` is the last failure's message."""

    def __init__(self, lib, pte_path):
        self._lib = lib
        self._handle = lib.ane_runner_open(str(pte_path).encode())
        if not self._handle:
            raise OpenError(lib.ane_runner_last_error(None).decode())

    def close(self):
        if self._handle:
            self._lib.ane_runner_close(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def error(self):
        return self._lib.ane_runner_last_error(self._handle).decode()

    def info(self):
        info = Info()
        self._lib.ane_runner_get_info(self._handle, ctypes.byref(info))
        return info

    def prefill(self, ids):
        return Status(self._lib.ane_runner_prefill(self._handle, (ctypes.c_int32 * len(ids))(*ids), len(ids)))

    def next(self):
        """(status, id)."""
        out = ctypes.c_int32(-1)
        status = Status(self._lib.ane_runner_next(self._handle, ctypes.byref(out)))
        return status, out.value

    def generate(self, prompt, max_new):
        """(ids, final status): the prompt fed, then up to max_new ids (a stop id not included)."""
        status, ids = self.prefill(prompt), []
        while status == Status.OK and len(ids) < max_new:
            status, token = self.next()
            if status == Status.OK:
                ids.append(token)
        return ids, status

    def set_sampling(self, temperature=0.0, top_p=1.0, seed=0):
        sampling = Sampling(temperature, top_p, seed)
        return Status(self._lib.ane_runner_set_sampling(self._handle, ctypes.byref(sampling)))

    def set_stop_ids(self, ids):
        return Status(self._lib.ane_runner_set_stop_ids(self._handle, (ctypes.c_int32 * len(ids))(*ids), len(ids)))

    def stop_ids(self):
        n = self._lib.ane_runner_get_stop_ids(self._handle, None, 0)
        out = (ctypes.c_int32 * n)()
        self._lib.ane_runner_get_stop_ids(self._handle, out, n)
        return list(out)

    def logits(self):
        """The last fed token's logits as a list of floats, or None."""
        pointer = self._lib.ane_runner_logits(self._handle)
        return list(pointer[:self.info().vocab_size]) if pointer else None

    def reset(self):
        self._lib.ane_runner_reset(self._handle)
