"""Bookkeeping shared by the blocks and networks: layer caches by name, gradients by name.

A network's forward calls its layers in order and keeps each layer's cache
under the layer's name; its backward calls the layers' backwards in reverse
and files each layer's local gradients ({"weight": .., "bias": ..}) under the
layer's parameter prefix. Two closures do that, so the forward and backward
of a block read like its equations:

    run = recorder(caches, need_grad)
    h = run("conv0", conv2d_forward(x, W, b, 1, 1))       # caches["conv0"] = the conv's cache

    back = backprop(caches, grads, prefix="enc.16x16_block0")
    dx = back("conv0", dh, conv2d_backward)               # grads["enc.16x16_block0.conv0.weight"] += dW

With need_grad=False nothing is kept: each layer's cache is dropped the moment
the layer returns, so a forward-only pass holds only the activations in use.
"""
from __future__ import annotations

from .params import accumulate_all


def recorder(caches: dict, need_grad: bool):
    """run(name, (y, cache)) -> y; stores cache in caches[name] only when need_grad."""
    def run(name: str, layer_output):
        y, cache = layer_output
        if need_grad:
            caches[name] = cache
        return y
    return run


def backprop(caches: dict, grads: dict, prefix: str = ""):
    """back(name, d, layer_backward, full_names=False) -> the layer's input gradient.

    Calls layer_backward(d, caches[name]) -> (d_input, layer grads) and adds the
    layer grads into grads under "{prefix}.{name}.{key}" (shared weights add up),
    or under their own keys when the layer returns full names already (full_names=True).
    """
    def back(name: str, d, layer_backward, full_names: bool = False):
        d_input, layer_grads = layer_backward(d, caches[name])
        if full_names:
            accumulate_all(grads, layer_grads)
        else:
            accumulate_all(grads, layer_grads, f"{prefix}.{name}" if prefix else name)
        return d_input
    return back


# The same bookkeeping for forward-mode passes: a layer's jvp returns (y, y_dot, cache) and
# its jvp_backward(dy, dy_dot, cache) -> (dx, dx_dot, local grads).

def jvp_recorder(caches: dict, need_grad: bool):
    """run(name, (y, y_dot, cache)) -> (y, y_dot); stores cache in caches[name] only when need_grad."""
    def run(name: str, layer_output):
        y, y_dot, cache = layer_output
        if need_grad:
            caches[name] = cache
        return y, y_dot
    return run


def jvp_backprop(caches: dict, grads: dict, prefix: str = ""):
    """back(name, d, d_dot, layer_jvp_backward, full_names=False) -> (d_input, d_input_dot)."""
    def back(name: str, d, d_dot, layer_jvp_backward, full_names: bool = False):
        d_input, d_input_dot, layer_grads = layer_jvp_backward(d, d_dot, caches[name])
        if full_names:
            accumulate_all(grads, layer_grads)
        else:
            accumulate_all(grads, layer_grads, f"{prefix}.{name}" if prefix else name)
        return d_input, d_input_dot
    return back
