"""What calibrating one block reports: its timings, and separately what it measured and decided."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlockTiming:
    """Seconds per phase of :func:`rptq.calibrate.calibrate_block`, and the passes over the calibration set."""
    stats_s: float = 0.0
    transform_s: float = 0.0
    weights_s: float = 0.0
    output_s: float = 0.0
    passes: int = 0


@dataclass
class BlockReport:
    """One calibrated block: its errors against FP, the method's decisions and where transforms went."""
    timing: BlockTiming = field(default_factory=BlockTiming)
    layouts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # point -> channel groups (clusters)
    decisions: dict[str, dict] = field(default_factory=dict)
    placements: list[dict] = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    ranges: dict = field(default_factory=dict)  # point -> before/after channel ranges (--act_dist_plot)
