"""Input validation shared by every layer: one place, one wording.

Shape, dtype and device checks read only metadata, so they work under
``torch.func`` transforms.  Value checks (NaN/Inf) need a host sync; they are
skipped for tensors batched by ``vmap`` (the solve itself then reports a
non-finite status instead).
"""

from __future__ import annotations

import torch

from .errors import InputError
from .torch_private import in_transform, is_vmapped, tracks_grad  # noqa: F401  (re-exported: the probes live there)

__all__ = ["as_float_tensor", "check_same_dtype_device", "check_finite", "is_vmapped", "in_transform",
           "tracks_grad", "FLOAT_DTYPES", "autocast_hint"]

FLOAT_DTYPES = (torch.float32, torch.float64)


def as_float_tensor(name: str, x, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``x`` as a float32/float64 tensor or raise an :class:`InputError` naming ``name``."""
    if not isinstance(x, torch.Tensor):
        if like is None:
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        try:
            x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{name} must be a torch.Tensor (or numbers), got {type(x).__name__}") from None
    if x.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"{name} has dtype {x.dtype}; implicitdiff solves in float32 or float64 "
            f"(convert with {name}.to(torch.float64) or .float(){autocast_hint(x)})"
        )
    return x


def autocast_hint(t: torch.Tensor) -> str:
    """The end of a dtype error's hint when ``torch.autocast`` is on for ``t``'s device, else ``""``: the
    tensor autocast produced stays in its dtype once autocast is off, so the hint says to *compute* it
    (or the map that returned it) under ``torch.autocast(device, enabled=False)``."""
    device = t.device.type
    try:
        on = torch.is_autocast_enabled(device)
    except TypeError:  # pragma: no cover - torch < 2.4: no device argument, CUDA's flag only
        on = torch.is_autocast_enabled()
    return (f"; torch.autocast is on and produced it: compute it under torch.autocast({device!r}, enabled=False)"
            if on else "")


def check_same_dtype_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise if any of ``others`` differs from ``ref`` in dtype or device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise InputError(
                f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                f"convert one of them, e.g. {name}.to({ref_name}.dtype)"
            )
        if t.device != ref.device:
            raise InputError(
                f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                f"move them to one device, e.g. {name}.to({ref_name}.device)"
            )


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise an :class:`InputError` if ``t`` holds NaN or Inf (one host sync; skipped under vmap)."""
    if is_vmapped(t):
        return
    if t.layout == torch.sparse_coo:
        vals = t._values()  # also for an uncoalesced tensor (duplicates are checked one by one)
    elif t.layout != torch.strided:
        vals = t.values()
    else:
        vals = t
    if bool(torch.isfinite(vals.sum())):  # one cheap reduction; the exact count only on failure
        return
    if not bool(torch.isfinite(vals).all()):
        bad = (~torch.isfinite(vals)).sum().item()
        raise InputError(f"{name} contains {bad} NaN or Inf value(s); clean or mask the input before solving")
