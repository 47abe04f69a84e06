"""Which control to move in each widget notebook, and what must change when it moves.

One row per notebook that displays widgets, keyed by its path under notebooks/: a Move, a tuple of
Moves (a notebook with several apps), or a NoMove saying why there is nothing to move. The browser test
opens the notebook, runs all cells, finds the control by its label, moves it as a learner would
(a slider one step with the arrow keys, a dropdown to its next option, a button clicked ...), and
waits until the named output of the same cell changes. A listed control that is missing fails the
test with the labels that are there; a notebook that shows widgets but has no row fails too.

To add a row: the `label` is the widget's `description` (for a button, its text), as shown in the
notebook; `changes` is "figure" (a plotly figure redrawn) or "text" (printed or HTML output);
`scope="notebook"` when the output that changes is in another cell than the control.
"""
from __future__ import annotations

from dataclasses import dataclass

CONTROLS = ("slider", "dropdown", "toggle", "checkbox", "text", "button")
CHANGES = ("figure", "text")
SCOPES = ("cell", "notebook")


@dataclass(frozen=True)
class Move:
    """Move the `control` labelled `label`; then the `changes` output in `scope` must differ."""

    control: str  # one of CONTROLS
    label: str  # the widget's description (a button's text), exactly as shown
    changes: str  # one of CHANGES
    scope: str = "cell"  # one of SCOPES: the output area of the control's cell, or the whole notebook
    value: str | None = None  # what to type, for control="text"

    def __post_init__(self):
        for name, allowed in (("control", CONTROLS), ("changes", CHANGES), ("scope", SCOPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}")
        if (self.control == "text") != (self.value is not None):
            raise ValueError("value is needed for control='text', and only for it")

    def describe(self) -> str:
        return f"{self.control} {self.label!r}"


@dataclass(frozen=True)
class NoMove:
    """A notebook whose widgets have nothing to move (a progress bar only, say): say why."""

    reason: str


INTERACTIONS: dict = {
    "02_online_softmax.ipynb": Move("slider", "block", "figure"),  # the stepper: next block of keys
    "03_tiling.ipynb": (
        Move("slider", "step", "figure"),  # loop explorer: the next step of the FA2 loop
        Move("slider", "d", "figure"),  # block-size explorer: another head size d
    ),
    "04_memory.ipynb": Move("slider", "N (tokens)", "figure"),  # measured and counted memory at another N
    "05_io_complexity.ipynb": Move("slider", "N (tokens)", "figure"),  # the HBM-traffic breakdown at another N
    "07_gpu_kernels.ipynb": Move("slider", "lane", "figure"),  # mma.sync's fragments: another lane's elements
    "08_live_benchmarks.ipynb": Move("button", "Run", "figure"),  # the dashboard's sweep redraws the chart
    "11_backward.ipynb": Move("slider", "step", "figure"),  # Algorithm 2's stepper: the next (j, i) tile
    "13_variants.ipynb": Move("slider", "window", "figure"),  # the block mask of another sliding window
    "14_ring_attention.ipynb": Move("slider", "step", "figure"),  # the ring's stepper: the next ring step
}


def moves(row) -> tuple:
    """The Moves of a table row (none for a NoMove)."""
    if isinstance(row, Move):
        return (row,)
    if isinstance(row, NoMove):
        return ()
    if isinstance(row, tuple) and row and all(isinstance(m, Move) for m in row):
        return row
    raise TypeError(f"a row is a Move, a tuple of Moves or a NoMove; got {row!r}")
