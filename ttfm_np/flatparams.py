"""Parameters, gradients and optimizer moments stored in one contiguous buffer.

A FlatParams is an ordinary parameter dict (params.py: name -> array) whose
arrays are views into ONE 1-D buffer, in key order:

    buffer = [ p_0.ravel() | p_1.ravel() | ... | p_{K-1}.ravel() ]      (sum of sizes,)
    d[k_i] = buffer[offset_i : offset_i + size_i].reshape(shape_i)

Every layer reads d[k] as before. What changes is the cost of the per-step
bookkeeping that walks all tensors: Adam's ~13 elementwise passes, the EMA's 2
and the gradient norm's dot product run ONCE over the buffer instead of once
per tensor (optim.py takes that path when every operand is a FlatParams of the
same layout). For the main job's MLP (13-14 tensors, ~50k parameters) that is
Adam 0.3 -> 0.1 ms and the EMA 0.1 -> 0.02 ms per update on one core, about a
sixth of a teacher update (docs/benchmarks.md, "Main job"); for a U-Net with
hundreds of tensors it is one kernel launch instead of hundreds on the GPU.

The views stay views: assigning d[k] = a COPIES a into the view (same shape
required), so the buffer always holds what the dict shows. Adding or deleting
keys is refused (the layout is fixed). A copy (copy.deepcopy, pickle) is a new
FlatParams with its own buffer.
"""
from __future__ import annotations

from . import backend


class FlatParams(dict):
    """dict name -> array view into `self.buffer` (1-D, one dtype), in key order; see the module doc."""

    def __init__(self, arrays: dict):
        arrays = dict(arrays)
        if not arrays:
            raise ValueError("FlatParams needs at least one array")
        first = next(iter(arrays.values()))
        xp = backend.array_module(first)
        dtypes = {a.dtype for a in arrays.values()}
        if len(dtypes) != 1:
            raise ValueError(f"FlatParams holds one dtype, got {sorted(str(d) for d in dtypes)}: "
                             "cast the parameters to one dtype first (params.astype)")
        # buffer = [p_0.ravel() | p_1.ravel() | ...]: one copy of every array, in key order
        buffer = xp.concatenate([xp.ravel(a) for a in arrays.values()]) if len(arrays) > 1 \
            else xp.ravel(first).copy()
        views, start = {}, 0
        for k, a in arrays.items():
            views[k] = buffer[start:start + a.size].reshape(a.shape)
            start += a.size
        super().__init__(views)
        self.buffer = buffer
        # (key, shape) in buffer order: two FlatParams with equal layouts line up element for element
        self.layout = tuple((k, tuple(a.shape)) for k, a in arrays.items())

    def same_layout(self, other) -> bool:
        """True when other is a FlatParams whose buffer lines up with this one's (keys, shapes, dtype, device)."""
        return (isinstance(other, FlatParams) and other.layout == self.layout
                and other.buffer.dtype == self.buffer.dtype
                and backend.array_module(other.buffer) is backend.array_module(self.buffer))

    def __setitem__(self, key, value):
        if key not in self:
            raise KeyError(f"FlatParams: no parameter {key!r} (the layout is fixed; build a new FlatParams)")
        view = dict.__getitem__(self, key)
        if tuple(value.shape) != view.shape:
            raise ValueError(f"FlatParams[{key!r}]: shape {tuple(value.shape)} does not match {view.shape}")
        view[...] = value                 # copy into the buffer: the dict and the buffer never disagree

    def update(self, other=(), **kw):
        for k, v in dict(other, **kw).items():
            self[k] = v

    def _fixed(self, *args, **kw):
        raise TypeError("FlatParams has a fixed layout: keys cannot be added or removed "
                        "(make a plain dict: dict(flat), or a new FlatParams)")

    __delitem__ = pop = popitem = clear = setdefault = _fixed

    def __reduce__(self):
        # copy.deepcopy and pickle rebuild from a plain dict of the arrays: a new buffer, not a shared one
        return (FlatParams, ({k: v.copy() for k, v in self.items()},))

    def copy(self):
        return FlatParams({k: v.copy() for k, v in self.items()})


def pack(arrays: dict, like: FlatParams | None = None) -> FlatParams:
    """arrays as a FlatParams (one copy into a new buffer); `like`: in like's key order (same keys needed).

    A FlatParams of the wanted order is returned as is (no copy)."""
    if like is not None:
        if arrays.keys() != like.keys():
            missing, extra = sorted(set(like) - set(arrays)), sorted(set(arrays) - set(like))
            raise ValueError(f"cannot pack like the parameters: missing {missing}, unexpected {extra}")
        if isinstance(arrays, FlatParams) and like.same_layout(arrays):
            return arrays
        arrays = {k: arrays[k] for k in like}
    elif isinstance(arrays, FlatParams):
        return arrays
    return FlatParams(arrays)


def zeros_like(flat: FlatParams) -> FlatParams:
    """A FlatParams of zeros with flat's layout (Adam's fresh moments)."""
    xp = backend.array_module(flat.buffer)
    return FlatParams({k: xp.zeros_like(v) for k, v in flat.items()})


def all_flat(first: FlatParams, *others) -> bool:
    """True when first is a FlatParams and every other one lines up with it (optim.py's one-pass path)."""
    return isinstance(first, FlatParams) and all(first.same_layout(o) for o in others)

