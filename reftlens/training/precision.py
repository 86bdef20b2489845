"""Precision: the context each training forward runs in (fp32, or bfloat16 autocast), and whether
this CPU computes bfloat16 natively."""

from __future__ import annotations

import contextlib
import platform
import warnings
from typing import Any

import torch

PRECISIONS = ("fp32", "bf16", "bf16-force")


class EmulatedBF16Warning(UserWarning):
    """``precision="bf16"`` on a CPU without native bfloat16: the run trains in fp32 instead."""


def autocast_for(precision: str, device: torch.device) -> Any:
    """The context each forward runs in: nothing (fp32) or bfloat16 autocast.

    ``"bf16"`` on a CPU without native bfloat16 would be emulated, up to tens of times slower
    than fp32 (38x reported on an AVX2 AMD EPYC), so it falls back to fp32 and warns once;
    ``"bf16-force"`` does not ask the CPU."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" and device.type == "cpu":
        native, capability = cpu_bf16_support()
        if not native:
            _warn_emulated_bf16(capability)
            return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


_NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # x86 AVX512-BF16 / AMX-BF16, Arm BF16 / SVE-BF16


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively, and torch's name for its vector capability
    (``torch.backends.cpu.get_cpu_capability()``: ``"AVX2"``, ``"AVX512"``, ...).

    Native means AVX512-BF16 or AMX-BF16 on x86, BF16 or SVE-BF16 on Arm, as
    ``torch.cpu.get_capabilities()`` reports them. A torch without that function is asked for
    AVX512-BF16 and AMX on x86; elsewhere it cannot tell, and bfloat16 is taken as native."""
    capability = torch.backends.cpu.get_cpu_capability()
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        flags = get_capabilities()
        return any(bool(flags.get(f, False)) for f in _NATIVE_BF16), capability
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() in ("x86_64", "amd64") and all(probes):
        return any(p() for p in probes), capability
    return True, capability


_warned_bf16 = False


def _warn_emulated_bf16(capability: str) -> None:
    global _warned_bf16
    if _warned_bf16:
        return
    _warned_bf16 = True
    warnings.warn(
        f"precision='bf16', but this CPU (torch capability {capability!r}) has no native bfloat16 "
        "(no AVX512-BF16 or AMX-BF16): bf16 would be emulated, up to tens of times slower than fp32, "
        "so training runs in fp32. Pass precision='bf16-force' to use bf16 autocast anyway.",
        EmulatedBF16Warning,
        stacklevel=4,  # the caller of train()
    )
