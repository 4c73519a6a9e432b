"""cupy.cuda of the stand-in: one pretend device, runtime queries, streams."""
from .. import _standin
from . import runtime

_TOTAL = 80 * 1024 ** 3          # report an 80 GB card


class Device:
    def __init__(self, device=None):
        self.id = int(device or 0)
        if self.id != 0:
            raise runtime.CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    compute_capability = "90"

    @property
    def mem_info(self):
        return _TOTAL - _standin.counters["live_bytes"], _TOTAL

    def synchronize(self):
        _standin.synchronize()

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)


class Stream:
    def synchronize(self):
        _standin.synchronize()


Stream.null = Stream()


def get_current_stream():
    return Stream.null


def is_available():
    return "driver" not in _standin._missing
