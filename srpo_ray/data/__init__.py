"""Data: verl-layout parquet -> `Prompt`s (`parquet`), the bundled training sets (`builtin`)
and held-out sets (`eval_sets`)."""
