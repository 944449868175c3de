"""Coordinates the learner ranks (actor handles offering `.method.remote(...)`): splits
each batch over the ranks, computes the global loss denominator, calls every rank and
collects the results. Plain Python: tests drive it with fakes, and Ray is only needed
for the default `get` (imported lazily so this module stays importable without Ray).

Every learner method is collective, so each call here goes to ALL ranks at once and
waits for all of them: a rank that fails surfaces its exception instead of leaving its
peers blocked in a collective.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from srpo_ray.batch import TrainBatch, loss_denominator, split_for_ranks


def _ray_get(refs: Any) -> Any:
    import ray

    return ray.get(refs)


class LearnerGroup:
    def __init__(self, handles: Sequence[Any], loss_agg: str, get: Callable[[Any], Any] = _ray_get):
        """handles: one per rank, in rank order. loss_agg: algo.loss_agg, which decides
        the global denominator (response tokens or sequences of the whole batch)."""
        if not handles:
            raise ValueError("LearnerGroup needs at least one rank handle (learner.num_ranks >= 1)")
        self.handles = list(handles)
        self.loss_agg = loss_agg
        self.get = get

    @property
    def world_size(self) -> int:
        return len(self.handles)

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self.get([getattr(h, method).remote(*args) for h in self.handles])

    def setup(self) -> None:
        self._all("setup")

    def train(self, batch: TrainBatch, temperature: float) -> dict:
        """One update on `batch`. The token-mean denominator is the response-token count
        of the whole batch (seq-mean modes: its sequence count), passed to every rank so
        the ranks' summed gradients are the gradient of the batch loss. A batch with
        nothing to train on (no response tokens) changes nothing and reports
        `learner/skipped_empty_batch`. Returns rank 0's metrics (all ranks return the
        same, all-reduced dict)."""
        if batch.num_response_tokens == 0:
            return {"learner/skipped_empty_batch": 1.0, "learner/response_tokens": 0.0}
        denominator = loss_denominator(batch, self.loss_agg)
        shards = split_for_ranks(batch, self.world_size)
        refs = [h.train_step.remote(shard, denominator, temperature)
                for h, shard in zip(self.handles, shards)]
        return self.get(refs)[0]

    def state_dict_ref(self) -> Any:
        """An object ref to rank 0's full state dict (HF names, CPU tensors). Every rank
        takes part in the gather; only rank 0's result is kept, and it is not pulled to
        the driver: pass the ref on to the generators."""
        refs = [h.full_state_dict.remote() for h in self.handles]
        self.get(refs[1:])  # the other ranks return None; waiting surfaces their errors
        return refs[0]

    def save(self, directory: str) -> None:
        """Checkpoint into `directory` (hf/ and learner/); see FSDPLearner.save_checkpoint."""
        self._all("save_checkpoint", str(directory))

    def load(self, directory: str) -> None:
        self._all("load_checkpoint", str(directory))

    def logprobs_of(self, input_ids: Any, attention_mask: Any = None, temperature: float = 1.0) -> Any:
        """[B, T] log-probs of each token given its prefix (for verification)."""
        return self._all("logprobs_of", input_ids, attention_mask, temperature)[0]

    def ping(self) -> list[Any]:
        return self._all("ping")
