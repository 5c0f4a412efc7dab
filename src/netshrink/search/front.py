"""Measured candidates of ``auto``, their Pareto front (table and plot), and the result."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from netshrink.outdir import write_atomic
from netshrink.recipe import Result, save_run
from netshrink.search.analysis import Sensitivity
from netshrink.search.target import Goal


@dataclass
class Candidate:
    """One recipe the search measured: its rates, metric and whether it meets the target."""

    round: int
    budget: float
    recipe: dict[str, Any]
    compression_rate: float
    speedup_rate: float
    compressed_bytes: int
    latency_ms: float
    metric: float
    metric_drop: float
    predicted_loss: float = 0.0

    @classmethod
    def measured(
        cls,
        round_: int,
        budget: float,
        recipe: dict[str, Any],
        summary: dict[str, Any],
        goal: Goal,
        rate: float,
    ) -> Candidate:
        """A candidate from a recipe run's report summary."""
        return cls(
            round_,
            budget,
            recipe,
            summary["compression_rate"],
            summary["speedup_rate"],
            summary["compressed_bytes"],
            summary["latency_ms_after"],
            summary["metric_after"],
            summary["metric_drop"],
        )

    def rate(self, goal: Goal) -> float:
        """The achieved rate of the goal's kind (compression for size goals, else speedup)."""
        return self.compression_rate if goal.resource == "bytes" else self.speedup_rate

    def meets_resource(self, goal: Goal, rate: float) -> bool:
        """Whether the size or speed goal (as a rate) is reached."""
        return self.rate(goal) >= rate

    def meets(self, goal: Goal, rate: float) -> bool:
        """Whether both the goal and the drop limit hold."""
        ok_drop = goal.max_drop is None or self.metric_drop <= goal.max_drop
        return self.meets_resource(goal, rate) and ok_drop


@dataclass
class AutoResult:
    """What ``auto`` found: the target, every measured candidate, the chosen one and its run."""

    target: Goal
    goal_rate: float
    candidates: list[Candidate]
    best: Candidate
    result: Result
    sensitivity: Sensitivity

    @staticmethod
    def pick(candidates: list[Candidate], goal: Goal, rate: float) -> Candidate:
        """The most accurate candidate meeting the target, else the closest to it.

        Closest: among those meeting the size/speed goal the smallest drop; when none does,
        the highest rate.
        """
        met = [c for c in candidates if c.meets(goal, rate)]
        if met:
            return max(met, key=lambda c: (c.metric, c.rate(goal)))
        reached = [c for c in candidates if c.meets_resource(goal, rate)]
        if reached:
            return min(reached, key=lambda c: c.metric_drop)
        return max(candidates, key=lambda c: c.rate(goal))

    @property
    def met(self) -> bool:
        """Whether the chosen candidate meets the whole target."""
        return self.best.meets(self.target, self.goal_rate)

    @property
    def model(self) -> Any:
        """The compressed model of the chosen candidate."""
        return self.result.model

    def verdict(self) -> str:
        """One line: target met, or by how much the best candidate misses it."""
        b, goal = self.best, self.target
        what = "compression" if goal.resource == "bytes" else "speedup"
        got = f"{what} {b.rate(goal):.2f}x, metric drop {b.metric_drop:+.4f}"
        if self.met:
            return f"target {goal} met: {got} ({len(self.candidates)} candidates measured)"
        misses = []
        if not b.meets_resource(goal, self.goal_rate):
            misses.append(f"{what} {b.rate(goal):.2f}x < {self.goal_rate:.2f}x needed")
        if goal.max_drop is not None and b.metric_drop > goal.max_drop:
            misses.append(f"drop {b.metric_drop:.4f} > max_drop {goal.max_drop}")
        return (
            f"target {goal} NOT met after {len(self.candidates)} candidates: best has {got}; "
            + "; ".join(misses)
        )

    def pareto(self) -> list[Candidate]:
        """Candidates no other beats on both rate and metric, by increasing rate."""
        goal = self.target
        front = [
            c
            for c in self.candidates
            if not any(
                o.rate(goal) >= c.rate(goal)
                and o.metric >= c.metric
                and o is not c
                and (o.rate(goal) > c.rate(goal) or o.metric > c.metric)
                for o in self.candidates
            )
        ]
        return sorted(front, key=lambda c: c.rate(goal))

    def table(self) -> str:
        """Markdown table of every candidate; Pareto-optimal ones and the chosen one marked."""
        front = {id(c) for c in self.pareto()}
        rows = [
            "| round | compression | speedup | bytes | latency ms | metric | drop "
            "| Pareto | chosen |",
            "|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|",
        ]
        for c in self.candidates:
            rows.append(
                f"| {c.round} | {c.compression_rate:.2f}x | {c.speedup_rate:.2f}x | "
                f"{c.compressed_bytes} | {c.latency_ms:.3f} | {c.metric:.4f} | "
                f"{c.metric_drop:+.4f} | {'*' if id(c) in front else ''} | "
                f"{'*' if c is self.best else ''} |"
            )
        return "\n".join(rows)

    def plot(self, path: str | Path) -> Path:
        """Metric vs rate of every candidate, the Pareto front joined, the target drawn."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        goal = self.target
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter([c.rate(goal) for c in self.candidates], [c.metric for c in self.candidates])
        front = self.pareto()
        ax.plot([c.rate(goal) for c in front], [c.metric for c in front], "r-", label="Pareto")
        ax.axvline(self.goal_rate, color="gray", linestyle="--", label="target")
        ax.set_xlabel("compression rate" if goal.resource == "bytes" else "speedup rate")
        ax.set_ylabel("metric")
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def recipe_yaml(self) -> str:
        """The chosen recipe as YAML that ``netshrink compress`` runs."""
        return yaml.safe_dump(self.best.recipe, sort_keys=False)

    def save(self, out: str | Path, extra: dict[str, Any] | None = None) -> dict[str, Path]:
        """Write recipe.yaml, pareto.md/png, sensitivity.json/png and the run into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = save_run(self.result, out, extra)
        paths["recipe"] = _write(out / "recipe.yaml", self.recipe_yaml())
        parts = ["# Search", self.verdict()]
        if note := self.sensitivity.note():
            parts.append(f"Not searched: {note}.")
        paths["pareto"] = _write(out / "pareto.md", "\n\n".join([*parts, self.table()]) + "\n")
        paths["pareto_plot"] = self.plot(out / "pareto.png")
        paths["sensitivity"] = self.sensitivity.save(out / "sensitivity.json")
        paths["sensitivity_plot"] = self.sensitivity.plot(out / "sensitivity.png")
        return paths


def _write(path: Path, text: str) -> Path:
    write_atomic(path, text.encode())
    return path
