"""The device: names, tensor-core peaks, memory, out-of-memory errors, versions."""
from __future__ import annotations

import platform
import re

import torch
from diffusers import training_utils

from sur_lib.infra.provenance import versions as package_versions


PEAK_TFLOPS: list[tuple[str, str, float, float]] = [
    ("H200 NVL", "NVIDIA H200 NVL", 835.5, 835.5),
    ("H200", "NVIDIA H200 SXM", 989.4, 989.4),
    ("H100 NVL", "NVIDIA H100 NVL", 835.5, 835.5),
    ("H100 PCIe", "NVIDIA H100 PCIe", 756.5, 756.5),
    ("H100", "NVIDIA H100 SXM", 989.4, 989.4),
    ("A100", "NVIDIA A100", 312.0, 312.0),
    ("L40S", "NVIDIA L40S", 362.1, 362.1),
    ("RTX 4090", "NVIDIA GeForce RTX 4090", 165.2, 165.2),
    ("RTX 3090 Ti", "NVIDIA GeForce RTX 3090 Ti", 80.0, 80.0),
    ("RTX 3090", "NVIDIA GeForce RTX 3090", 71.0, 71.0),
]

RTX3090 = {
    "name": "NVIDIA GeForce RTX 3090",
    "memory_gib": 24.0,
    "fp16_tensor_fp32_accumulate_tflops": 71.0,  # what autocast uses: the peak of the estimate
    "fp16_tensor_fp16_accumulate_tflops": 142.0,
    "fp32_non_tensor_tflops": 35.6,
    "source": "NVIDIA Ampere GA102 GPU architecture whitepaper, appendix A (dense, no sparsity)",
}

RTX3090_UTILISATION = (0.35, 0.25, 0.45)

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def free_memory() -> None:
    """Collect garbage and give cached CUDA blocks back (between configurations, after an OOM).
    Without CUDA nothing to do (a gc pass costs ~0.5 s per call on a loaded 2-core machine)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        training_utils.free_memory()  # diffusers' own: gc, then the accelerator's cache

def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, also when wrapped (torch.compile wraps errors in its own)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({name or platform.machine()}, {torch.get_num_threads()} threads)"

def device_slug(device: torch.device) -> str:
    """"cpu", or the GPU's name in lowercase words: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    name = re.sub(r"\b(nvidia|geforce)\b", " ", name)
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"

def peak_tflops(name: str) -> dict | None:
    """The dense bf16/fp16 tensor peaks of a device from ``PEAK_TFLOPS`` (None if unknown)."""
    for key, label, bf16, fp16 in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return {"matched": key, "label": label, "bf16": bf16, "fp16": fp16}
    return None

def versions() -> dict:
    """Python, platform, torch, diffusers, transformers, accelerate, sur_lib (and CUDA)."""
    out = package_versions(("torch", "diffusers", "transformers", "accelerate", "sur_lib"))
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out
