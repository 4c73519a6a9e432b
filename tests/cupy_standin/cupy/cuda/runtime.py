"""cupy.cuda.runtime of the stand-in."""
from .. import _standin


class CUDARuntimeError(RuntimeError):
    pass


def getDeviceCount():
    if "driver" in _standin._missing:
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    return 1


def getDeviceProperties(device):
    getDeviceCount()
    return {"name": b"CuPy stand-in (CPU emulation, no GPU)", "totalGlobalMem": 80 * 1024 ** 3,
            "major": 9, "minor": 0, "multiProcessorCount": 132}


def deviceSynchronize():
    _standin.synchronize()


def memGetInfo():
    from . import Device
    return Device(0).mem_info


def runtimeGetVersion():
    return 12080


def driverGetVersion():
    return 12080
