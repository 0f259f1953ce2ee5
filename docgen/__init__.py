"""Document generation: docs/results.md and the README's generated blocks, rendered from stored runs (docs/runs,
docs/bench) alone; above eval/ (it reads runs as eval/ records them) and rptq/ (method names and settings)."""
