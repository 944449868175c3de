"""Ray glue: the only part of srpo_ray that imports Ray. `build` assembles a run
(Ray, placement, actors, fleets, the trainer); `fleets` and `worker_pool` hand work to
generation and reward workers and replace dead ones; `learner_group` drives the FSDP
learner ranks. Everything else in srpo_ray is plain Python and torch, tested without Ray."""
