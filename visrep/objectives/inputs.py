"""Checks of what an objective receives: the number of student and target views and their [B, D] shapes."""
from __future__ import annotations

from visrep.errors import ConfigError


def check_views(
    name: str,
    student: list,
    target: list,
    *,
    min_student: int = 2,
    min_target: int = 2,
    max_student: int | None = None,
) -> None:
    """Raise ConfigError unless the view lists have the sizes and [B, D] shapes required."""
    if not isinstance(student, (list, tuple)) or not isinstance(target, (list, tuple)):
        raise ConfigError(f"objective '{name}': student and target must be lists of tensors")
    if len(student) < min_student:
        raise ConfigError(
            f"objective '{name}' needs at least {min_student} student views, got {len(student)}"
        )
    if max_student is not None and len(student) > max_student:
        raise ConfigError(
            f"objective '{name}' uses exactly {max_student} views (no multi-crop), "
            f"got {len(student)} student views"
        )
    if len(target) < min_target:
        raise ConfigError(
            f"objective '{name}' needs at least {min_target} target views, got {len(target)}"
        )
    shapes = {tuple(t.shape) for t in list(student) + list(target) if t.dim() != 2}
    if shapes:
        raise ConfigError(f"objective '{name}': every view must be [B, D], got shapes {sorted(shapes)}")
    views = list(student) + list(target)
    if len({t.shape[1] for t in views}) != 1 or len({t.shape[0] for t in views}) != 1:
        raise ConfigError(
            f"objective '{name}': all views must share one [B, D] shape, "
            f"got {sorted({tuple(t.shape) for t in views})}"
        )
