"""The search: a deterministic, budgeted descent over the candidates' probe objective.

1. **Screen**: every candidate method at its starting point (the template's values, else the
   declared defaults), then every method with per-model weights at that point with its weights
   halved (for task arithmetic: λ = 0.5, the usual default merge; not when the method
   normalizes the weights, where it would be the same merge). So the defaults are always
   scored, and the winner is never worse than them on the score the search ranks by.
2. **Refine** the best two methods (each from its better screened point) a few steps each, then the better of them to the end: a
   pattern search over its dimensions and along the uniform scaling of all its model
   weights (the direction that matters most for task-vector methods). Each direction is
   tried one step up and one step down; when neither improves, the parabola through the three
   values proposes a point, and the step halves. Directions are visited in an order drawn from
   the seed; steps end at 1/64 of a range.
3. **Groups** (optional): the winner's weights are split by layer group (attention, MLP,
   rest) and the pattern search continues from there.

Every candidate is a pure function of the seed and the results before it, so a run resumed
from its log replays the earlier trials from the log (no evaluation) and continues exactly
where it stopped. Candidates are rounded to four decimals and never evaluated twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from .space import Space

MIN_STEP_FRACTION = 1 / 64
SCREEN_REFINE_TRIALS = 4        # trials each of the two best methods gets before one is chosen


class Stop(Exception):
    """Raised by the evaluation callback when the budget (time or trial count) is spent."""


@dataclass
class Point:
    space: Space
    x: list[float]
    value: float


@dataclass
class Direction:
    """A search direction: a unit move of one dimension, or of all model weights together."""

    dims: list[int]
    step: float
    label: str
    history: list[str] = field(default_factory=list)


Evaluate = Callable[[Space, list[float], str], "float | None"]


class PatternSearch:
    """Coordinate / uniform-scale pattern search with parabolic proposals over one Space.

    Args:
        evaluate: ``evaluate(space, x, phase) -> objective`` (raises :class:`Stop` when the
            budget is spent).
        rng: The seeded random generator that orders the directions.
    """

    def __init__(self, evaluate: Evaluate, rng: random.Random, phase: str):
        self.evaluate, self.rng, self.phase = evaluate, rng, phase

    def directions(self, space: Space, scale: float = 1.0) -> list[Direction]:
        out = [Direction([i], (d.high - d.low) / 4 * scale, d.label) for i, d in enumerate(space.dims)]
        w = space.weight_dims
        if len(w) > 1:
            d = space.dims[w[0]]
            out.append(Direction(w, (d.high - d.low) / 4 * scale, "all weights"))
        return out

    def _moved(self, space: Space, x: list[float], direction: Direction, t: float) -> list[float]:
        y = list(x)
        for i in direction.dims:
            y[i] += t
        return space.point(y)

    def run(self, start: Point, *, steps: int | None = None, scale: float = 1.0) -> Point:
        """Search from ``start``; at most ``steps`` evaluations when given (else until the steps
        are below the resolution). Returns the best point found."""
        space, best = start.space, start
        dirs = self.directions(space, scale)
        min_step = {id(d): (space.dims[d.dims[0]].high - space.dims[d.dims[0]].low) * MIN_STEP_FRACTION
                    for d in dirs}
        used = [0]

        def ev(x: list[float]) -> float | None:
            if steps is not None and used[0] >= steps:
                raise _Enough
            used[0] += 1
            return self.evaluate(space, x, self.phase)

        try:
            while any(d.step >= min_step[id(d)] for d in dirs):
                order = [d for d in dirs if d.step >= min_step[id(d)]]
                self.rng.shuffle(order)
                for d in order:
                    best = self._line(best, d, ev)
        except _Enough:
            pass
        return best

    def _line(self, best: Point, d: Direction, ev: Callable[[list[float]], float | None]) -> Point:
        space, x, h = best.space, best.x, d.step
        up = self._moved(space, x, d, h)
        f_up = ev(up) if up != x else None
        if f_up is not None and f_up < best.value:
            return Point(space, up, f_up)          # keep the step: the next sweep may go further
        down = self._moved(space, x, d, -h)
        f_down = ev(down) if down != x else None
        if f_down is not None and f_down < best.value:
            return Point(space, down, f_down)
        d.step /= 2
        if f_up is not None and f_down is not None:
            curvature = f_up - 2 * best.value + f_down
            if curvature > 0:
                t = h * (f_down - f_up) / (2 * curvature)
                if abs(t) > d.step / 4:
                    y = self._moved(space, x, d, t)
                    if y not in (x, up, down):
                        f = ev(y)
                        if f is not None and f < best.value:
                            return Point(space, y, f)
        return best


class _Enough(Exception):
    pass


def halved(space: Space) -> list[float] | None:
    """The starting point with every per-model weight halved (None: the method has none, or it
    normalizes the weights by their sum, so that halving them all would merge the same model)."""
    if not space.weight_dims or space.normalizes_weights:
        return None
    return [v / 2 if i in space.weight_dims else v for i, v in enumerate(space.start)]


def search(spaces: list[Space], evaluate: Evaluate, *, seed: int, group_space: Callable[[Point], Point] | None,
           log: Callable[[str], None] | None = None) -> Point | None:
    """Run the three phases (module docstring) and return the best point found (None when
    not even one candidate could be evaluated).

    Args:
        spaces: One per candidate method.
        evaluate: ``evaluate(space, x, phase) -> objective``; raises :class:`Stop` when the
            budget is spent (the search then returns the best so far).
        seed: Orders the directions.
        group_space: Maps the best ungrouped point to its grouped space (None: no group phase).
    """
    rng = random.Random(seed)
    best: list[Point] = []

    def note(p: Point | None) -> None:
        if p is not None and (not best or p.value < best[0].value):
            best[:] = [p]

    def tracked(space: Space, x: list[float], phase: str) -> float | None:
        v = evaluate(space, x, phase)
        if v is not None:
            note(Point(space, list(x), v))          # kept even if the budget ends the phase
        return v

    try:
        screened: dict[int, Point] = {}            # the best screened point of each space
        for x_of in (lambda s: s.start, halved):
            for i, s in enumerate(spaces):
                x = x_of(s)
                if x is None:
                    continue
                x = s.point(x)
                v = tracked(s, x, "screen")
                if v is not None and (i not in screened or v < screened[i].value):
                    screened[i] = Point(s, x, v)
        if not screened:
            return None
        finalists = sorted(screened.values(), key=lambda p: p.value)[:2]
        if len(finalists) > 1:
            finalists = [PatternSearch(tracked, rng, "refine").run(p, steps=SCREEN_REFINE_TRIALS) for p in finalists]
        lead = min(finalists, key=lambda p: p.value)
        lead = PatternSearch(tracked, rng, "refine").run(lead)
        if group_space is not None:
            PatternSearch(tracked, rng, "groups").run(group_space(lead), scale=0.5)
    except Stop:
        pass
    return best[0] if best else None


def objective(nll: dict[str, float], kind: str, weights: dict[str, float]) -> float:
    """The searched number from per-probe mean NLLs (log perplexities): their mean, the worst
    one, or their weighted mean."""
    if kind == "worst":
        return max(nll.values())
    if kind == "weighted":
        total = sum(weights[k] for k in nll)
        return sum(weights[k] * v for k, v in nll.items()) / total
    return sum(nll.values()) / len(nll)


def pareto(trials: list[dict[str, Any]], key: str = "nll") -> list[int]:
    """Indices of the trials no other trial beats on every probe (≤ everywhere, < somewhere)."""
    front = []
    for i, a in enumerate(trials):
        dominated = False
        for j, b in enumerate(trials):
            if j == i:
                continue
            if all(b[key][p] <= a[key][p] for p in a[key]) and any(b[key][p] < a[key][p] for p in a[key]):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front
