"""What a feature-extraction run did: one :class:`SlideRecord` per slide, combined into an
:class:`ExtractionSummary` (over ``torchrun`` ranks too) that prints as a short report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import H5_DIR

__all__ = ["ExtractionSummary", "SlideRecord"]


@dataclass
class SlideRecord:
    """What happened to one slide (``status``: ``"done"``, ``"skipped"`` or ``"failed"``)."""

    slide: str
    status: str
    reason: str = ""
    n_patches: int = 0
    seconds: float = 0.0
    rank: int = 0
    output: str = ""


@dataclass
class ExtractionSummary:
    """The run summary (combined over ``torchrun`` ranks).

    Attributes:
        done: slides embedded in this run.
        skipped: ``(slide, reason)`` for slides whose output was already complete.
        failed: ``(slide, reason)`` for slides that could not be processed.
        warnings: ``(slide, message)``, e.g. slides without tissue (empty files).
        n_patches: tiles embedded in this run.
        seconds: wall-clock time of the run (the slowest rank).
        world_size: number of ranks.
        records: one :class:`SlideRecord` per slide (rank, patches, output file...).
        out_dir: the output folder.
    """

    done: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    n_patches: int = 0
    seconds: float = 0.0
    world_size: int = 1
    records: list[SlideRecord] = field(default_factory=list)
    out_dir: str = ""

    @property
    def ok(self) -> bool:
        """No slide failed."""
        return not self.failed

    @property
    def patches_per_second(self) -> float:
        """Tiles embedded per second of the run (``0`` for an empty run)."""
        return self.n_patches / self.seconds if self.seconds > 0 else 0.0

    def add(self, record: SlideRecord) -> None:
        """Count one slide's record."""
        self.records.append(record)
        if record.status == "done":
            self.done.append(record.slide)
            self.n_patches += record.n_patches
        elif record.status == "skipped":
            self.skipped.append((record.slide, record.reason))
        else:
            self.failed.append((record.slide, record.reason))

    @classmethod
    def merge(cls, parts: Sequence[ExtractionSummary]) -> ExtractionSummary:
        """Combine per-rank summaries (records sorted by slide)."""
        merged = cls(world_size=max((p.world_size for p in parts), default=1),
                     out_dir=parts[0].out_dir if parts else "",
                     seconds=max((p.seconds for p in parts), default=0.0))
        for record in sorted((r for p in parts for r in p.records), key=lambda r: r.slide):
            merged.add(record)
        merged.warnings = sorted(w for p in parts for w in p.warnings)
        return merged

    def format(self) -> str:
        """Human-readable summary: totals, then one line per slide."""
        lines = [f"feature extraction: {len(self.records)} slide(s): {len(self.done)} done, "
                 f"{len(self.skipped)} skipped, {len(self.failed)} failed; {self.n_patches} "
                 f"patches in {self.seconds:.1f} s ({self.patches_per_second:.1f} patches/s)"
                 + (f" on {self.world_size} ranks" if self.world_size > 1 else "")]
        for r in self.records:
            detail = (f"{r.n_patches} patches, {r.seconds:.1f} s" if r.status == "done"
                      else r.reason)
            lines.append(f"  {r.status.upper() if r.status == 'failed' else r.status:8s} "
                         f"[rank {r.rank}] {r.slide}: {detail}")
        for slide, message in self.warnings:
            lines.append(f"  warning  {slide}: {message}")
        if self.out_dir:
            lines.append(f"output: {Path(self.out_dir) / H5_DIR}")
        return "\n".join(lines)
