"""What structured pruning changed, as plain data, so any model reloads from its factory without pickles.

torch-pruning shrinks tensors in place and rewrites the module's size attributes (`out_features`,
`in_channels`, `num_features`, ...). `structure_edits` records exactly that difference against a freshly
built model: per module, the new shapes of its parameters and buffers and the new values of its plain
(number, string, tuple) attributes. `apply_structure` replays it on a fresh model, which then takes the pruned
state dict. torch-pruning's own `tp.state_dict` copies each module's `__dict__` (hooks, modules): not
weights_only-loadable, hence this.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Edits = dict[str, dict[str, dict[str, Any]]]  # module -> {"shapes": {tensor: [dims]}, "attrs": {name: value}}
_PLAIN = (bool, int, float, str)


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    out = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        if isinstance(value, _PLAIN) or (isinstance(value, tuple | list) and all(isinstance(v, _PLAIN) for v in value)):
            out[name] = list(value) if isinstance(value, tuple | list) else value
    return out


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(recurse=False)),
            **{n: b for n, b in module.named_buffers(recurse=False) if b is not None}}


def structure_edits(fresh: nn.Module, pruned: nn.Module) -> Edits:
    """The shapes and attributes in which `pruned` differs from `fresh` (same architecture, unpruned)."""
    fresh_modules = dict(fresh.named_modules())
    edits: Edits = {}
    for name, module in pruned.named_modules():
        before = fresh_modules[name]
        shapes = {t: list(v.shape) for t, v in _tensors(module).items()
                  if t in _tensors(before) and v.shape != _tensors(before)[t].shape}
        old_attrs = _plain_attrs(before)
        attrs = {k: v for k, v in _plain_attrs(module).items() if k in old_attrs and old_attrs[k] != v}
        if shapes or attrs:
            edits[name] = {"shapes": shapes, "attrs": attrs}
    return edits


def apply_structure(model: nn.Module, edits: Edits) -> nn.Module:
    """Give `model` (freshly built) the shapes and attributes `edits` recorded; its values are then loaded."""
    modules = dict(model.named_modules())
    for name, edit in edits.items():
        if name not in modules:
            raise ValueError(f"structure names module {name!r}, which the model does not have")
        module = modules[name]
        for tensor, shape in edit.get("shapes", {}).items():
            old = _tensors(module)[tensor]
            new = torch.empty(shape, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                setattr(module, tensor, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module.register_buffer(tensor, new)
        for attr, value in edit.get("attrs", {}).items():
            setattr(module, attr, tuple(value) if isinstance(getattr(module, attr), tuple) else value)
    return model
