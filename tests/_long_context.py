"""Helpers for the long-context tests: the largest tensor any op makes, and tiny converted GPT-Neos."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KERNEL = {"bank": {"n_splats": 8}, "backend": "kernel"}


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (bytes) any op allocates inside the block, and which op.

    Why storage bytes: views (``expand``) have a large ``numel`` and no memory of their own; an ``n x n``
    buffer, mask or score matrix shows up as an op output whatever module makes it. Why only fresh storage:
    an output that shares its storage with an input (a view, an ``out=`` write into a reused workspace,
    such as the kernel backend's per-thread block buffers, which an earlier call may have grown) allocated
    nothing here. Ops on the current thread only (``torch``'s dispatch modes are thread-local), meta tensors
    skipped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.op: str | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.device.type != "meta"
                    and t.untyped_storage().data_ptr() not in inputs):
                size = t.untyped_storage().nbytes()
                if size > self.bytes:
                    self.bytes, self.op = size, str(func)
        return out


def converted(seed: int = 0, **params: Any) -> Any:
    """A tiny GPT-Neo (64 positions, a global and a local layer, window 4) converted with the kernel backend."""
    from _adapter_models import tiny_gpt_neo

    from gsa_plugins.adapters import convert

    return convert(tiny_gpt_neo(seed), {**KERNEL, "adapter": {"name": "gpt-neo", "params": params}})
