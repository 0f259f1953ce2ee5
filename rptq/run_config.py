"""What one run is asked to do: the RunConfig that ``main.py`` builds from the flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import QuantConfig

# The default --seqlen is capped at the papers' 2048 tokens: a model's maximum position count (8192
# for SmolLM2) would make every quantized block build T x T fp32 attention scores per head.
SEQLEN_CAP = 2048


@dataclass(frozen=True)
class RunConfig:
    model: str
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval_ppl: bool = False
    eval_base_ppl: bool = False
    ppl_datasets: tuple[str, ...] = ("wikitext2", "ptb", "c4")
    tasks: tuple[str, ...] = ()
    tasks_source: str = "auto"
    task_bos: str = "auto"
    num_fewshot: int = 0
    limit: int = -1
    nsamples: int = 128
    seqlen: int | None = None
    calib_dataset: str = "mix"
    cache_dir: str | None = None
    output_path: str | None = None
    device: str = "auto"
    offload_dir: str | None = None
    save_quantized: str | None = None
    load_quantized: str | None = None
    export_format: str | None = None  # --export FORMAT DIR (rptq.export_rules.FORMATS)
    export_dir: str | None = None
    multigpu: bool = False
    max_memory_gib: float | None = None  # None: what the device has free when the run starts
    resume: bool = True
    progress: bool = True
    act_dist_plot: bool = False
    plot_layers: str = "0,mid,-1"

    def flat(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "quant"}
        out.update(self.quant.flat())
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def seqlen_for(self, max_positions: int) -> tuple[int, str]:
        """(the calibration / evaluation window length this run uses, the line that says why)."""
        if self.seqlen:
            return self.seqlen, f"seqlen {self.seqlen} (--seqlen)"
        seqlen = min(max_positions, SEQLEN_CAP)
        return seqlen, f"seqlen {seqlen} (default: min(model max positions {max_positions}, {SEQLEN_CAP}))"

    @property
    def eval_limit(self) -> int | None:
        """--limit as the evaluators take it: None for all windows / documents."""
        return self.limit if self.limit > 0 else None
