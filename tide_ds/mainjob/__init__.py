"""The main job (`tide-ds demo`): data and tokenizers, an MoE teacher, four students, evaluation,
results. Each stage is a module; `tide_ds.demo` runs them in order and reuses what exists."""
