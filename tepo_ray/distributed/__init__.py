"""Distributed pieces of the learner, one small module each (contract in its docstring).

* `device`        — which torch device a role runs on (from its placement-group bundle).
* `process_group` — forming one torch.distributed group across learner actors.
* `fsdp`          — sharding a causal LM with FSDP2 (`fully_shard`), mixed precision.
* `checkpoint`    — sharded checkpoints with torch.distributed.checkpoint (atomic commit, reshard on load).
* `learner_group` — `LearnerGroup`: the driver's one handle on N learner actors.

Full (name, tensor) pairs of a plain or sharded model: `tepo_ray.weights.params.iter_full_state`.
"""
