"""Non-negative least squares for a handful of coefficients, in pure Python: the simulator's calibration and the
router's cost model fit with it, and neither needs torch or numpy for a few unknowns."""

from __future__ import annotations

import statistics


def lstsq(rows: list[list[float]], y: list[float]) -> list[float]:
    """Coefficients >= 0 for which `rows` best predict `y`: normal equations, dropping any column whose coefficient
    comes out negative and solving again."""
    active = list(range(len(rows[0])))
    while True:
        a = [[sum(r[i] * r[j] for r in rows) for j in active] for i in active]
        b = [sum(r[i] * t for r, t in zip(rows, y, strict=True)) for i in active]
        solution = _solve(a, b)
        negative = [k for k, v in zip(active, solution, strict=True) if v < 0]
        if not negative:
            full = [0.0] * len(rows[0])
            for k, v in zip(active, solution, strict=True):
                full[k] = v
            return full
        active.remove(min(negative, key=lambda k: solution[active.index(k)]))


def robust_lstsq(rows: list[list[float]], y: list[float]) -> list[float]:
    """lstsq, then again without the samples more than 3 robust standard deviations off: steps that another process
    stalled on a shared machine."""
    fit = lstsq(rows, y)
    residuals = [t - sum(c * x for c, x in zip(fit, row, strict=True)) for row, t in zip(rows, y, strict=True)]
    scale = 1.4826 * statistics.median(abs(r) for r in residuals)
    kept = [(row, t) for row, t, r in zip(rows, y, residuals, strict=True) if abs(r) <= 3 * scale]
    return lstsq([row for row, _ in kept], [t for _, t in kept]) if scale > 0 and kept else fit


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting; a singular column gets 0."""
    n = len(b)
    m = [[*row, v] for row, v in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-300:
            continue
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] if abs(m[i][i]) >= 1e-300 else 0.0 for i in range(n)]
