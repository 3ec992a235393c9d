"""The numerics policy of an extraction, and the attrs that say what decided its numbers.

float32 extractions are strict: every float32 matmul and convolution runs in IEEE float32 (no
TF32 on CUDA, where PyTorch enables it for cuDNN convolutions by default and Wan's patch
embedding is a Conv3d; no bfloat16 inside oneDNN on CPU), with PyTorch's deterministic
algorithms. bfloat16/float16 extractions get deterministic algorithms and keep the configured
matmul precision. ``numerics_policy`` applies the policy for the body of a ``with`` and
restores every setting after; what it yields records the attention backend that actually
ran. Measured drift and the tolerances chosen from it: ``docs/numerics.md``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import diffusers
import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from attn_harness.core.environment import cpu_name, environment_class, numerics_env

# torch.backends.<name>.fp32_precision settings (PyTorch >= 2.9) that a strict policy pins.
PRECISION_KNOBS: tuple[str, ...] = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")
CUBLAS_DETERMINISTIC = ":4096:8"  # the workspace setting cuBLAS needs for reproducible results


@dataclass(frozen=True)
class Policy:
    """What an extraction of one dtype pins: fp32 precision (None: as configured), determinism."""

    fp32_precision: str | None
    deterministic: bool
    description: str


POLICIES: dict[str, Policy] = {
    "float32": Policy("ieee", True,
                      "strict: float32 matmul and convolution in IEEE float32 (TF32 off), deterministic algorithms"),
    "bfloat16": Policy(None, True, "deterministic algorithms; matmul precision as configured"),
    "float16": Policy(None, True, "deterministic algorithms; matmul precision as configured"),
}


def _backend(path: str):
    target = torch.backends
    for part in path.split("."):
        target = getattr(target, part, None)
    return target


def _has_precision_api() -> bool:
    return all(hasattr(_backend(knob), "fp32_precision") for knob in PRECISION_KNOBS)


def precision_settings() -> dict[str, str]:
    """The current fp32 precision per backend (``none`` means "follow the global default")."""
    if _has_precision_api():
        return {knob: str(_backend(knob).fp32_precision) for knob in PRECISION_KNOBS}
    return {  # PyTorch < 2.9: the legacy TF32 switches
        "cuda.matmul.allow_tf32": str(torch.backends.cuda.matmul.allow_tf32),
        "cudnn.allow_tf32": str(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def _set_precision(settings: dict[str, str]) -> None:
    if _has_precision_api():
        for knob, value in settings.items():
            _backend(knob).fp32_precision = value
        return
    torch.backends.cuda.matmul.allow_tf32 = settings["cuda.matmul.allow_tf32"] == "True"
    torch.backends.cudnn.allow_tf32 = settings["cudnn.allow_tf32"] == "True"
    torch.set_float32_matmul_precision(settings["float32_matmul_precision"])


def _strict_precision(precision: str) -> dict[str, str]:
    if _has_precision_api():
        return dict.fromkeys(PRECISION_KNOBS, precision)
    return {"cuda.matmul.allow_tf32": "False", "cudnn.allow_tf32": "False", "float32_matmul_precision": "highest"}


class AttentionBackends(TorchFunctionMode):
    """Records which kernel each ``scaled_dot_product_attention`` call dispatches to.

    Asks ``torch._fused_sdp_choice`` with the call's own arguments: the function SDPA itself
    uses to pick flash, memory-efficient, cuDNN or math attention.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.seen.add(_sdpa_choice(args, kwargs))
        return func(*args, **kwargs)


def _sdpa_choice(args: tuple, kwargs: dict) -> str:
    query = args[0] if args else kwargs["query"]
    try:
        name = SDPBackend(torch._fused_sdp_choice(*args, **kwargs)).name
    except (RuntimeError, TypeError, ValueError, AttributeError):
        name = "unknown"
    return f"{name} ({str(query.dtype).removeprefix('torch.')})"


def device_name(device: torch.device) -> str:
    """The GPU's name and compute capability, or the CPU's model name."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return cpu_name()


def environment_attrs(device: torch.device) -> dict[str, str | int]:
    """What decides the numbers besides the model, the probe and the policy: hardware, kernels, threads."""
    attrs: dict[str, str | int] = {
        "device_name": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "numerics_env": numerics_env(),
        "torch_version": str(torch.__version__),
        "diffusers_version": diffusers.__version__,
    }
    if device.type == "cuda":
        attrs["cuda_version"] = str(torch.version.cuda)
        attrs["cudnn_version"] = str(torch.backends.cudnn.version())
    return attrs


@dataclass
class NumericsRecord:
    """What ran under ``numerics_policy``; ``attrs()`` goes into the dataset."""

    dtype: str
    device: torch.device
    policy: Policy
    precision: dict[str, str]
    deterministic: bool
    backends: AttentionBackends = field(default_factory=AttentionBackends)

    def attrs(self) -> dict[str, str | int | bool]:
        active = _AttentionBackendRegistry.get_active_backend()[0]
        sdpa = ", ".join(sorted(self.backends.seen)) or "none"
        return {
            "environment_class": environment_class(str(self.device), self.dtype),
            "numerics_policy": f"{self.dtype} {self.policy.description}",
            "fp32_precision": " ".join(f"{key}={value}" for key, value in self.precision.items()),
            "deterministic_algorithms": self.deterministic,
            "attention_backend": f"diffusers {getattr(active, 'value', active)}; torch SDPA: {sdpa}",
            **environment_attrs(self.device),
        }


@contextmanager
def numerics_policy(dtype: str, device: torch.device) -> Iterator[NumericsRecord]:
    """Apply ``POLICIES[dtype]`` for the body and restore every setting after, even on error."""
    policy = POLICIES[dtype]
    saved_precision = precision_settings()
    saved_deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    saved_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_cublas = device.type == "cuda" and policy.deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        if policy.fp32_precision is not None:
            _set_precision(_strict_precision(policy.fp32_precision))
        if policy.deterministic:
            if set_cublas:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
            # warn_only: an op without a deterministic kernel warns instead of aborting the run
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        record = NumericsRecord(dtype=dtype, device=device, policy=policy, precision=precision_settings(),
                                deterministic=torch.are_deterministic_algorithms_enabled())
        with record.backends:
            yield record
    finally:
        _set_precision(saved_precision)
        torch.use_deterministic_algorithms(saved_deterministic[0], warn_only=saved_deterministic[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_cudnn
        if set_cublas:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
