"""The settings of the guidance extensions (``sur_lib.guidance``, not in the paper), checked:
S-CFG's (``SCFGConfig``) on creation and delayed conditioning's schedule. Errors are ValueErrors
that name the setting and the value."""
from __future__ import annotations

import math

ORDERS = ("plain_first", "adapted_first")  # delayed conditioning: which embedding comes first


def check_scfg(cfg) -> None:
    """S-CFG's settings (an ``SCFGConfig``): sides and terms >= 1, an odd blur size, finite
    numbers, 0 < gamma_min <= gamma_max, a blur sigma and a max scale > 0, a fixed gamma >= 0."""
    if cfg.max_side < 1 or cfg.refine_terms < 1:
        raise ValueError(f"max_side and refine_terms must be >= 1, got {cfg.max_side}, {cfg.refine_terms}")
    if cfg.blur_size < 1 or cfg.blur_size % 2 == 0:
        raise ValueError(f"blur_size must be odd and >= 1, got {cfg.blur_size}")

    def finite(name):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"S-CFG {name} must be a finite number, got {v!r}")
        return v

    for name in ("blur_sigma", "gamma_min", "gamma_max", "max_scale"):
        finite(name)
    if not 0 < cfg.gamma_min <= cfg.gamma_max:
        raise ValueError(f"need 0 < gamma_min <= gamma_max, got {cfg.gamma_min}, {cfg.gamma_max}")
    # the Gaussian kernel divides by sigma (0 gives NaN images); gamma is clamped to
    # max_scale / w, so max_scale <= 0 would switch guidance off (0) or invert it (< 0)
    if cfg.blur_sigma <= 0:
        raise ValueError(f"S-CFG blur_sigma must be > 0 (the blur's kernel divides by it), "
                         f"got {cfg.blur_sigma!r}")
    if cfg.max_scale <= 0:
        raise ValueError(f"S-CFG max_scale must be > 0 (it bounds w * gamma; <= 0 would turn "
                         f"guidance off or invert it), got {cfg.max_scale!r}")
    if cfg.fixed_gamma is not None and finite("fixed_gamma") < 0:
        raise ValueError(f"S-CFG fixed_gamma must be >= 0 (a negative scale inverts guidance), "
                         f"got {cfg.fixed_gamma!r}")


def check_schedule(num_steps: int, alpha: float, order: str) -> None:
    """Delayed conditioning's arguments: an order of ``ORDERS``, alpha in [0, 1], steps >= 1."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
