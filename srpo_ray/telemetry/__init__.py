"""What a run reports: `metrics` (metrics.jsonl, progress), `trackers` (TensorBoard, W&B,
MLflow), `console` (logs and events), `plot`."""
