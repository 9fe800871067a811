"""What made a result: package versions, exact weight digests, repository-relative paths.

Every results file records these, so that a number can be traced to the code, the packages
and the weights that produced it:

* ``versions(packages)``: Python, the platform and the installed version of each package
  (read from the package metadata, so nothing heavy is imported);
* ``state_digest(module)``: SHA-256 over a module's state dict (names, dtypes and bytes);
* ``rel_path`` / ``abs_path``: paths relative to the repository root inside it, so a JSON
  file does not depend on where the repository was cloned.
"""
from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[2]  # the repository root (sur_lib's parent)

BASE_PACKAGES = ("numpy", "scipy", "pillow", "torch", "sur_lib")


def package_version(name: str) -> str | None:
    """The installed version of ``name`` (None when it is not installed); ``sur_lib`` run from
    a checkout without installation reports its ``__version__``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        if name == "sur_lib":
            from .. import __version__

            return __version__
        return None


def versions(packages: Iterable[str] = BASE_PACKAGES) -> dict:
    """``{"python", "platform", <package>: version or None, ...}`` for ``packages``."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in packages:
        out[pkg] = package_version(pkg)
    return out


def state_digest(module) -> str:
    """SHA-256 over a module's state dict (names and bytes): identifies weights exactly."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rel_path(path: str | os.PathLike) -> str:
    """A path relative to the repository root when inside it (JSON stays machine-independent)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def abs_path(path: str | os.PathLike) -> Path:
    """The inverse of ``rel_path``: a relative path is taken from the repository root."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p
