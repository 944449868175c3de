"""Learner -> generator weight transfer, one file per transport (as slime's
update_weight_from_*.py and prime-rl's transports/weights/):

  layout.py         bucket planning, pack/unpack (pure)
  source.py         what is published: a state dict in hand, or a model streamed per parameter
  transport.py      the WeightTransport roles (publish / load / deliver), each transport's traits,
                    the registry, `auto`, and every error a caller catches
  common.py         what transports share: rendezvous store, free port, host copy, slot check,
                    the catch-up copy late joiners load
  endpoints.py      each actor's one weight endpoint (WeightSender, WeightReceiver)
  shared_memory.py  a reused /dev/shm file read in place (CPU default)
  object_store.py   Ray's object store (also every catch-up copy)
  broadcast.py      a torch.distributed gloo group (CPU)
  nccl.py           vLLM's NCCL weight transfer (separate GPUs; TP workers get their shards)
  cuda_ipc.py       vLLM's CUDA IPC weight transfer (colocated on one GPU)
  reload_file.py    a safetensors file for multi-process engines fed from the CPU (the fallback)

Nothing here imports Ray; vLLM only inside the GPU transports' generation side. Code
outside this package never names a transport: it asks the transport's class
(tests/unit/test_transport_names.py), so a new transport is one file and one `register` line.
"""
from srpo_ray.weights.transport import (  # noqa: F401
                                        PublishedWeights,
                                        StalePolicyError,
                                        WeightDeliveryError,
                                        WeightsSupersededError,
                                        resolve_for,
                                        resolve_transport,
)
