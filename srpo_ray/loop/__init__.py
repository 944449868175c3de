"""The training loop: `trainer` (the step), `pipeline` (when a step is collected),
`collect` (how), `checkpoint` (atomic run state)."""
