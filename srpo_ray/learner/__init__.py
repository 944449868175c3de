"""The learner: one FSDP2 rank's step (`core`), sharded weight I/O (`sharded_weights`), and
scored groups -> per-rank micro-batches (`batch`). Pure torch: no Ray."""
