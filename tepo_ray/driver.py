"""TEPO training driver: the schedule, top to bottom.

What runs (DESIGN.md sections 1–2):

1. **Placement.** One placement group from `cfg.topology` (generators, scorers,
   learner, python and search tool pools, in that bundle order); every actor is
   pinned to its bundle.
2. **Rollout.** Prompts are admitted as groups of `algo.group_size` samples.
   Admission is AReaL-style: with learner version v, at most
   `(v + max_staleness + 1) * rollout_batch_groups` groups may have been admitted,
   and at most `async.max_inflight_groups` are generating at once. Generators
   never wait for the learner; they load new weights between turns.
3. **Scoring.** Finished groups go to an EntropyScorer, which runs a
   teacher-forced forward with the *behaviour* version's weights: exact
   full-vocabulary token entropy, behaviour log-probs and ΔH_k per call.
4. **Learning.** When `rollout_batch_groups` scored groups are buffered and the
   learner is idle, the oldest are trained on. A group whose staleness
   (learner version − behaviour version) exceeds `max_staleness` is dropped,
   counted and logged — never trained on. Rewards (grpo | sparse | dense) and
   advantages are computed in the learner by `tepo_ray.algo`.
5. **Publication** (`tepo_ray.weights`, `weights.transport`). `collective`
   (default): the learner is rank 0 of a gloo/NCCL weight group that every
   generator engine (each vLLM worker) and scorer joined at start; after each
   step the driver starts the learner's broadcast and every receiver's receive
   together, bucket by bucket, and only metadata crosses Ray — no file, no
   shared filesystem. Generators load between turns; scorers keep the last
   `max_staleness + 2` versions in memory. `file` (opt-in, one node): the
   learner writes `v{N}.safetensors` and receivers read it by path.

`max_staleness = 0` is exact synchronous GRPO: only one batch is ever admitted
per version, so every sample is on-policy. Behaviour policy per token: a
trajectory that spans a weight update is scored turn by turn, each token with
the version that sampled it (`Trajectory.versions`), so neither the importance
ratio nor ΔH uses weights that did not sample the token; staleness is measured
from its oldest version. Log-probs and entropies (scorer and learner) use
`logits / engine.temperature`, the distribution that sampled; `top_p` is not
applied (see `tepo_ray.trainer.scorer`). Departure from the paper: the
importance ratio uses behaviour log-probs recomputed by the scorer, not the
engine's sampler log-probs.

Fault handling: actors are created with `max_restarts=-1`. A generator or
scorer that dies has its in-flight group re-queued (counted in
`faults/groups_retried_total`) and is re-sent the current weights once back
(collective: the weight group is formed again with every member, then the
current version is broadcast; a restarted scorer has lost older versions, so
groups that need them fail scoring and are re-generated).
"""

from __future__ import annotations

import collections
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tepo_ray.config import save_resolved, validate_resources
from tepo_ray.prepare import PreparedData, prepare_data
from tepo_ray.metrics import TOOLS, K, MetricsLogger, call_stats, plot_run
from tepo_ray.records import RecordError, Trajectory
from tepo_ray.tool_pools import QUIET_ENV, PoolPlacement, owned_pools, start_tool_pools
from tepo_ray.topology import TopologyPlan, plan_topology

__all__ = ["Driver", "train"]


# --------------------------------------------------------------------------- helpers
def _now_tag() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]


def resolve_run_dir(cfg: DictConfig, resume: str | None) -> Path:
    if resume:
        return Path(resume)
    if cfg.logging.run_dir:
        return Path(cfg.logging.run_dir)
    return Path("runs") / f"{cfg.logging.name}-{_now_tag()}"


MAX_GROUP_ATTEMPTS = 3  # a prompt whose group fails this often is skipped (counted), not retried forever

# Bounds on how long one call may hold up the schedule loop (admission, scoring, training).
STATS_TIMEOUT_S = 5.0  # a stats/metrics call; past it the value is missing from that record (counted)
LEARNER_RESTART_TIMEOUT_S = 600.0  # a dead learner must be back (checkpoint restored) within this
CHECKPOINT_WAIT_S = 600.0  # at the end of the run, for the last checkpoint write
MAX_CONSECUTIVE_SKIPPED_STEPS = 3  # non-finite loss/gradient this many steps in a row stops the run


def weight_versions_to_keep(max_staleness: int) -> int:
    """Weight files the learner keeps: every admissible behaviour version (learner version v minus
    0..s) plus the one being published while a group is scored, so `s + 2`."""
    return int(max_staleness) + 2

# Keep actor logs readable: engines and loaders are chatty at INFO.
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "1"}


def _transport_name(cfg: DictConfig) -> str:
    t = cfg.weights.transport if "weights" in cfg else "file"
    return str(getattr(t, "value", t))


def _nonfinite_step(metrics: dict[str, Any]) -> bool:
    """True when the learner skipped the step because its loss or gradient norm was NaN/inf."""
    import math

    if not float(metrics.get("learner/update_skipped", 0.0) or 0.0):
        return False
    vals = [metrics.get("learner/grad_norm"), metrics.get("learner/loss")]
    return any(isinstance(v, (int, float)) and not math.isfinite(float(v)) for v in vals)


def _truncate_metrics(path: Path, *, keep_through_step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they are redone), atomically."""
    if not path.exists():
        return
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if int(json.loads(line).get(K.STEP, 0)) <= keep_through_step:
                    kept.append(line)
            except (ValueError, json.JSONDecodeError):
                continue  # a torn last line from a killed run
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- driver
@dataclass
class _Group:
    group_id: str
    item: dict[str, Any]
    item_index: int
    admitted_at: int  # learner version at admission
    trajectories: list[Trajectory] = field(default_factory=list)

    @property
    def behaviour_version(self) -> int:
        """Oldest policy version that generated a token of this group. A trajectory that generated
        nothing has no version and must not make the group stale; a group with no generated token at
        all is judged by the version it was admitted at."""
        gen = [t.behaviour_version for t in self.trajectories if t.behaviour_version >= 0]
        return min(gen) if gen else self.admitted_at

    @property
    def num_samples(self) -> int:
        return len(self.trajectories)


class Driver:
    """Owns the actors and the schedule. `run()` trains `trainer.steps` steps."""

    def __init__(self, cfg: DictConfig, *, run_dir: str | Path, assets: PreparedData, resume: bool = False,
                 address: str | None = None, generator_cls: type | None = None,
                 generator_kwargs: dict[str, Any] | None = None, scorer_cls: type | None = None,
                 scorer_kwargs: dict[str, Any] | None = None, learner_cls: type | None = None,
                 learner_kwargs: dict[str, Any] | None = None):
        """`generator_cls` / `scorer_cls` / `learner_cls` replace the actor classes (e.g. actors.faults variants)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.assets = assets
        self.resume = resume
        self.address = address
        self.plan: TopologyPlan = plan_topology(cfg)
        self.step = 0
        self.version = 0
        self.cursor = 0  # next train item index to admit
        self.requeue: collections.deque[int] = collections.deque()  # item indices to admit first (retries, resume)
        self.counters = collections.Counter()
        self.attempts: dict[int, int] = {}  # item index -> failed attempts
        self.recovering: dict[tuple[str, int], tuple[Any, float]] = {}  # (role, index) -> (ready ref, since)
        self.weight_paths: dict[int, str] = {0: assets.model_path}  # file transport: version -> path
        self.weight_update: dict[str, Any] | None = None  # collective: the newest version's WeightUpdate
        self.evaluator: Any = None  # held-out eval during training (trainer.eval_interval), set in start()
        self.weight_sends: list[Any] = []  # refs of broadcasts in flight (errors surface in the loop)
        self.collective = _transport_name(cfg) == "collective"
        self._training = False
        self.generator_cls = generator_cls
        self.generator_kwargs = dict(generator_kwargs or {})
        self.scorer_cls = scorer_cls
        self.scorer_kwargs = dict(scorer_kwargs or {})
        self.learner_cls = learner_cls
        self.learner_kwargs = dict(learner_kwargs or {})

    # ---------------------------------------------------------------- set-up
    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.entropy_scorer import EntropyScorerActor
        from actors.generation import GenerationWorker

        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS") or None
            extra = {} if address else {"_system_config": {"worker_niceness": 0}}  # sandboxes inherit nice 15 otherwise
            ray.init(address=address, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": QUIET_ENV}, **extra)
        validate_resources(self.cfg, ray.cluster_resources())
        self.pg = placement_group(self.plan.bundle_specs(), strategy=self.plan.strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=self.cfg.topology.placement_timeout_s)
        if not ready:
            raise RuntimeError(
                f"placement group {self.plan.bundle_specs()} not placed within "
                f"{self.cfg.topology.placement_timeout_s}s; check `tepo-ray topology` against `ray status`"
            )

        def strategy(bundle):
            return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=bundle.index)

        def opts(bundle, **extra):
            return dict(num_cpus=bundle.num_cpus, num_gpus=bundle.num_gpus, scheduling_strategy=strategy(bundle),
                        max_restarts=-1, **extra)

        cfg = self.cfg
        temperature = float(cfg.engine.temperature)  # log-probs / entropies of the sampling distribution
        self.learner = self._start_learner(opts, temperature)
        scorer_kwargs = {"temperature": temperature, "cache_size": weight_versions_to_keep(cfg.async_.max_staleness),
                         "device": "auto", "dtype": cfg.model.dtype, **self.scorer_kwargs}
        scorer_cls = ray.remote(self.scorer_cls) if self.scorer_cls else EntropyScorerActor
        self.scorers = [
            scorer_cls.options(**opts(b)).remote(
                self.assets.model_path, algo_cfg=cfg.algo, weights_dir=str(self.run_dir / "weights"),
                name=f"scorer-{b.replica}", **scorer_kwargs)
            for b in self.plan.for_role("scorers")
        ]
        self.pools = start_tool_pools(cfg, index_dir=self.assets.index_dir,
                                      placement=PoolPlacement(self.pg, self.plan.for_role))
        gen_cls = ray.remote(self.generator_cls or GenerationWorker)

        def gen_opts(b):
            tp_bundles = self.plan.tp_bundle_indices(b.replica)
            if not tp_bundles:
                return opts(b, max_concurrency=10_000)
            # TP > 1: vLLM's Ray executor places one worker per one-GPU bundle of this placement group
            env = {**QUIET_ENV, "VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, tp_bundles))}
            return dict(num_cpus=b.num_cpus, num_gpus=0, max_restarts=-1, max_concurrency=10_000,
                        runtime_env={"env_vars": env},
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            placement_group=self.pg, placement_group_bundle_index=b.index,
                            placement_group_capture_child_tasks=True))

        self.generators = [
            gen_cls.options(**gen_opts(b)).remote(
                engine_cfg=cfg.engine, model_path=self.assets.model_path, pools=self.pools,
                max_observation_chars=cfg.tools.max_observation_chars, name=f"generator-{b.replica}",
                prompt_cfg=cfg.prompt, **self.generator_kwargs)
            for b in self.plan.for_role("generators")
        ]
        self.evaluator = None
        if cfg.trainer.eval_interval and self.assets.eval_items:
            # Greedy held-out eval every trainer.eval_interval steps: one extra generator outside the placement
            # group (temperature 0, the run's tool pools) and the first scorer for ΔH.
            from tepo_ray.evaluate import Evaluator

            self.eval_generator = ray.remote(GenerationWorker).options(
                num_cpus=0, num_gpus=cfg.topology.generators.num_gpus, max_concurrency=10_000).remote(
                engine_cfg=OmegaConf.merge(cfg.engine, {"temperature": 0.0}), model_path=self.assets.model_path,
                pools=self.pools, max_observation_chars=cfg.tools.max_observation_chars, name="eval-generator",
                prompt_cfg=cfg.prompt)
            self.evaluator = Evaluator(generator=self.eval_generator, scorer=self.scorers[0],
                                       malformed_calls=cfg.algo.malformed_calls)
        ray.get([a.ready.remote() for a in [self.learner, *self.scorers, *self.pools.values(),
                                            *self._weight_generators()]])
        if self.resume:
            self._restore()
        if self.collective:
            self._form_weight_group()
        update = ray.get(self.learner.weight_update.remote())
        self.version = version = int(update["version"])
        if self.collective:
            self.weight_update = update
            if version > 0:  # resumed: every receiver gets the restored weights before anything is generated
                ray.get(self._publish(update))
        else:
            self.weight_paths[version] = update["path"]
            if version > 0:
                ray.get([g.set_weights.remote(update["path"], version) for g in self._weight_generators()])

    # ---------------------------------------------------------------- weight sync
    def _weight_generators(self) -> list[Any]:
        """Every generator that must hold the current weights: the rollout ones and the eval one."""
        return [*self.generators, *([self.eval_generator] if self.evaluator is not None else [])]

    def _receivers(self) -> list[Any]:
        return [*self._weight_generators(), *self.scorers]

    def _form_weight_group(self) -> None:
        """(Re)form the collective weight group: learner rank 0, then each receiver's ranks."""
        import ray

        ranks = ray.get([r.weight_ranks.remote() for r in self._receivers()])
        world = 1 + sum(ranks)
        wc = self.cfg.weights
        name = f"tepo-{uuid.uuid4().hex[:8]}"
        info = ray.get(self.learner.open_weight_group.remote(name=name, world_size=world, backend=wc.backend,
                                                             timeout_s=float(wc.timeout_s)))
        refs = [self.learner.join_weight_group.remote(info)]
        offset = 1
        for r, n in zip(self._receivers(), ranks):
            refs.append(r.join_weight_group.remote(info, offset))
            offset += n
        ray.get(refs, timeout=float(wc.timeout_s))

    def _publish(self, update: dict[str, Any]) -> list[Any]:
        """Start the learner's broadcast of `update` and every receiver's receive; returns their refs."""
        v = int(update["version"])
        send = self.learner.send_weights.remote(update)
        gen_refs = [g.set_weights.remote(update, v) for g in self._weight_generators()]
        if self.evaluator is not None:
            self._eval_weights_ref = gen_refs[-1]  # _evaluate waits for the eval generator's copy
        refs = [send, *gen_refs, *[s.receive_weights.remote(update) for s in self.scorers]]
        self.weight_sends.extend(refs)
        return refs

    def _check_weight_sends(self) -> None:
        """Surface a failed broadcast or receive (a hung one fails after weights.timeout_s)."""
        import ray

        if not self.weight_sends:
            return
        done, self.weight_sends = ray.wait(self.weight_sends, num_returns=len(self.weight_sends), timeout=0)
        failed = None
        for ref in done:
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                pass  # a restarting receiver: _poll_recovering re-forms the group and re-sends
            except ray.exceptions.RayTaskError as exc:
                failed = str(exc).splitlines()[0][:300]
        if failed is None:
            if done:
                self._sync_failures = 0
            return
        # a receiver died mid-broadcast (the group breaks for everyone): count it, re-form, re-send
        self._sync_failures = getattr(self, "_sync_failures", 0) + 1
        self.counters["faults/weight_sync_failed_total"] += 1
        if self._sync_failures > 3:
            raise RuntimeError(f"weight sync failed {self._sync_failures} times in a row: {failed}")
        print(f"[tepo-ray] weight sync failed ({failed}); forming the weight group again")
        if not self.recovering:  # otherwise _poll_recovering re-forms once the actor is back
            ray.wait(self.weight_sends, num_returns=len(self.weight_sends), timeout=float(self.cfg.weights.timeout_s))
            self.weight_sends = []
            self._reform_and_resend()

    def _reform_and_resend(self) -> None:
        """Form the weight group again and re-send the current version, described for the NEW group (an
        update names its group). A receiver that is restarting is marked so (`_poll_recovering` forms the
        group once it is back); a step in flight publishes the next version to everyone anyway."""
        import ray

        try:
            self._form_weight_group()
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.GetTimeoutError) as exc:
            down = 0
            for role in ("generator", "scorer"):
                for i, actor in enumerate(self._actors(role)):
                    ready, _ = ray.wait([actor.ready.remote()], timeout=5)
                    try:
                        ray.get(ready) if ready else None
                    except ray.exceptions.RayError:
                        ready = []
                    if not ready:
                        if (role, i) not in self.recovering:
                            self.counters[K.RESTARTS] += 1  # died during the broadcast
                        self._mark_recovering(role, i)
                        down += 1
            if not down:
                raise RuntimeError(f"forming the weight group failed with every receiver alive: {exc}") from None
            return
        if self.version > 0 and not self._training:
            self.weight_update = ray.get(self.learner.weight_update.remote(), timeout=60)
            self._publish(self.weight_update)

    def _start_learner(self, opts: Any, temperature: float) -> Any:
        """One learner actor, or with `topology.learner.replicas = N > 1` a `LearnerGroup` of N FSDP2 ranks
        (one per learner bundle; a rank is not restarted alone, it could not rejoin the group).
        Each runs on its bundle's device ("auto") in `model.dtype`."""
        import ray

        from actors.learner import LearnerActor
        from tepo_ray.distributed.learner_group import LearnerGroup

        cfg = self.cfg
        actor_cls = ray.remote(self.learner_cls) if self.learner_cls else LearnerActor
        kwargs = dict(algo_cfg=cfg.algo, trainer_cfg=cfg.trainer, run_dir=str(self.run_dir), seed=cfg.trainer.seed,
                      resume=self.resume, weights_cfg=cfg.weights, temperature=temperature,
                      keep_weight_versions=weight_versions_to_keep(cfg.async_.max_staleness),
                      **{"device": "auto", "dtype": cfg.model.dtype, **self.learner_kwargs})
        bundles = self.plan.for_role("learner")
        if len(bundles) == 1:
            return actor_cls.options(**opts(bundles[0])).remote(self.assets.model_path, **kwargs)
        return LearnerGroup.create(actor_cls, bundles=bundles, options=lambda b: {**opts(b), "max_restarts": 0},
                                   args=(self.assets.model_path,), kwargs=kwargs)

    def _restore(self) -> None:
        import ray

        extra = ray.get(self.learner.restored.remote())
        if extra is None:
            raise FileNotFoundError(f"--resume {self.run_dir}: no complete checkpoint under {self.run_dir}")
        self.step = int(extra["step"])
        self.cursor = int(extra["cursor"])
        self.requeue = collections.deque(extra.get("requeue", []))
        self.counters = collections.Counter(extra.get("counters", {}))
        _truncate_metrics(self.run_dir / "metrics.jsonl", keep_through_step=self.step)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        import ray

        cfg = self.cfg
        s = cfg.async_.max_staleness
        B = cfg.async_.rollout_batch_groups
        G = cfg.algo.group_size
        logger = MetricsLogger(self.run_dir, wandb_mode=cfg.logging.wandb_mode, project=cfg.logging.wandb_project,
                               group=cfg.logging.wandb_group, name=self.run_dir.name,
                               config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), resume=self.resume)
        gen_inflight: dict[Any, tuple[_Group, int]] = {}  # ref -> (group, generator index)
        score_inflight: dict[Any, tuple[_Group, int]] = {}
        buffer: list[_Group] = []
        train_ref = None
        ckpt_ref = None  # the checkpoint write in progress on the learner
        consecutive_skips = 0
        train_batch: list[_Group] = []
        rr_gen = rr_score = 0
        t_start = time.perf_counter()
        t_last = t_start
        display = _Progress(enabled=cfg.logging.progress, total=cfg.trainer.steps, start=self.step)
        items = self.assets.train_items

        def next_item_index() -> int:
            if self.requeue:
                return self.requeue.popleft()
            idx = self.cursor
            self.cursor += 1
            return idx

        to_score: list[_Group] = []  # generated, waiting for a live scorer
        while self.step < cfg.trainer.steps:
            self._poll_recovering()
            self._check_weight_sends()
            # ---- admission (staleness bound + in-flight cap)
            live = len(gen_inflight) + len(to_score) + len(score_inflight) + len(buffer) + len(train_batch)
            # AReaL-style: groups trained so far + groups alive may not exceed (v + s + 1) batches, so
            # everything alive can be trained within s versions. Dropped groups free their slot.
            cap = min((self.version + s + 1) * B, cfg.trainer.steps * B)
            while len(gen_inflight) < cfg.async_.max_inflight_groups and self.step * B + live < cap:
                gi = self._pick("generator", rr_gen)
                if gi is None:  # every generator is restarting
                    break
                idx = next_item_index()
                item = items[idx % len(items)]
                group = _Group(group_id=f"s{self.step}-i{idx}-{uuid.uuid4().hex[:6]}", item=item, item_index=idx,
                               admitted_at=self.version)
                rr_gen = gi + 1
                ref = self.generators[gi].generate_group.remote(item, group_id=group.group_id, group_size=G)
                gen_inflight[ref] = (group, gi)
                self.counters[K.ADMITTED] += 1
                live += 1

            # ---- scoring with the behaviour version's weights
            while to_score:
                si = self._pick("scorer", rr_score)
                if si is None:
                    break
                rr_score = si + 1
                group = to_score.pop(0)
                bv = group.behaviour_version
                known = bv in self.weight_paths and not self.collective  # collective: scorers hold versions
                sref = self.scorers[si].score.remote(  # file: unknown versions are found in run_dir/weights
                    [t.to_dict() for t in group.trajectories],
                    weights_path=self.weight_paths[bv] if known else None, version=bv if known else None)
                score_inflight[sref] = (group, si)

            # ---- wait for anything to finish
            waitables = list(gen_inflight) + list(score_inflight) + ([train_ref] if train_ref is not None else []) \
                + ([ckpt_ref] if ckpt_ref is not None else [])
            done, _ = ray.wait(waitables, num_returns=1, timeout=1.0) if waitables else ([], [])
            if not waitables:
                time.sleep(0.2)  # only restarting actors: wait for them
            for ref in done:
                if ref in gen_inflight:
                    group, gi = gen_inflight.pop(ref)
                    trajs, died = self._fetch(ref, group, role="generator", index=gi)
                    if trajs is None:
                        if died:  # not the prompt's fault: generate it again, no attempt counted
                            self.counters[K.RETRIED_GROUPS] += 1
                            self.requeue.appendleft(group.item_index)
                        continue
                    group.trajectories = trajs
                    self.counters[K.SAMPLES_GENERATED] += group.num_samples
                    to_score.append(group)
                elif ref in score_inflight:
                    group, si = score_inflight.pop(ref)
                    scored, died = self._fetch(ref, group, role="scorer", index=si)
                    if scored is None:
                        if died:  # keep the generated trajectories; score them on a live scorer
                            self.counters[K.RETRIED_GROUPS] += 1
                            to_score.append(group)
                        else:  # the prompt was re-queued (or skipped): these samples are discarded
                            self.counters[K.SAMPLES_FAILED] += group.num_samples
                        continue
                    group.trajectories = scored
                    buffer.append(group)
                elif ref is train_ref:
                    train_ref = None
                    self._training = False
                    try:
                        metrics, update, version = ray.get(ref)
                    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                        # The learner died (mid-step or queued behind a checkpoint). It comes back with its
                        # last checkpoint; everything generated since belongs to a discarded timeline.
                        extra = self._recover_learner(exc)
                        lost = to_score + buffer + train_batch + [g for g, _ in gen_inflight.values()] \
                            + [g for g, _ in score_inflight.values()]
                        for r in list(gen_inflight) + list(score_inflight):
                            ray.cancel(r, force=False)
                        for pending_work in (gen_inflight, score_inflight, to_score, buffer):
                            pending_work.clear()
                        train_batch, ckpt_ref = [], None
                        print(f"[tepo-ray] learner restored step {extra['step']} (was at step {self.step}); "
                              f"{len(lost)} groups in flight are regenerated")
                        self._apply_restored(extra)
                        logger.rewind(keep_through_step=self.step)
                        break
                    except ray.exceptions.RayTaskError as exc:
                        raise RuntimeError(f"learner train step {self.step + 1} raised: "
                                           f"{str(exc).strip().splitlines()[-1][:500]}") from None
                    self.version = version
                    if not self.collective:
                        self.weight_paths[version] = update["path"]
                        for old in [v for v in self.weight_paths if v < version - s - 1 and v != 0]:
                            self.weight_paths.pop(old)
                    self.step += 1
                    self.counters[K.SAMPLES_TRAINED] += sum(g.num_samples for g in train_batch)
                    skipped = _nonfinite_step(metrics)
                    consecutive_skips = consecutive_skips + 1 if skipped else 0
                    # A skipped (non-finite) step publishes too: its weights equal the previous version's, but
                    # generators must carry the new number, or their samples would all turn stale and the run
                    # would stall before the consecutive-skip limit stops it.
                    if self.collective:
                        self.weight_update = update
                        self._publish(update)
                    else:
                        for g in self._weight_generators():
                            g.set_weights.remote(update["path"], version)
                    now = time.perf_counter()
                    in_flight = sum(g.num_samples for g in to_score + buffer) \
                        + sum(g.num_samples for g, _ in score_inflight.values())
                    record = self._step_metrics(metrics, train_batch, step_time=now - t_last,
                                                inflight=len(gen_inflight), samples_in_flight=in_flight)
                    t_last = now
                    train_batch = []
                    if self.evaluator is not None and self.step % cfg.trainer.eval_interval == 0:
                        record.update(self._evaluate(None if self.collective else update["path"], version))
                        record[K.TIME_EVAL] = time.perf_counter() - now
                        t_last = time.perf_counter()  # eval time is not the next step's time
                    logger.log(record)
                    display.update(self.step, record)
                    if consecutive_skips >= MAX_CONSECUTIVE_SKIPPED_STEPS:
                        raise RuntimeError(
                            f"{consecutive_skips} consecutive steps (last: {self.step}) had a non-finite loss or "
                            f"gradient and were skipped; stopping. Lower algo.lr, check algo.max_grad_norm, or "
                            f"resume from the last checkpoint in {self.run_dir / 'checkpoints'}")
                    if cfg.trainer.checkpoint_interval and (
                        self.step % cfg.trainer.checkpoint_interval == 0 or self.step == cfg.trainer.steps
                    ):
                        pending = [g.item_index for g in buffer + to_score] \
                            + [g.item_index for g, _ in gen_inflight.values()] \
                            + [g.item_index for g, _ in score_inflight.values()]
                        # Off the loop: the learner is a serial actor, so the next train step queues behind
                        # the save; the driver goes on admitting and scoring.
                        self._finish_checkpoint(ckpt_ref)
                        ckpt_ref = self.learner.save_checkpoint.remote(
                            self._checkpoint_extra(pending, samples_in_flight=in_flight))
                elif ref is ckpt_ref:
                    self._finish_checkpoint(ckpt_ref)
                    ckpt_ref = None

            # ---- train when the learner is idle and a batch is ready
            if train_ref is None and len(buffer) >= B:
                buffer.sort(key=lambda g: g.admitted_at)
                batch: list[_Group] = []
                while buffer and len(batch) < B:
                    g = buffer.pop(0)
                    staleness = self.version - g.behaviour_version
                    if staleness > s:
                        self.counters[K.DROPPED_STALE] += 1
                        self.counters[K.SAMPLES_DROPPED_STALE] += g.num_samples
                        continue
                    batch.append(g)
                if len(batch) < B:
                    buffer = batch + buffer
                    continue
                train_batch = batch
                self._training = True
                train_ref = self.learner.train_step_and_publish.remote(
                    [t.to_dict() for g in batch for t in g.trajectories])

        self._finish_checkpoint(ckpt_ref)
        display.close()
        wall = time.perf_counter() - t_start
        logger.close()
        summary = {"run_dir": str(self.run_dir), "metrics": str(logger.path), "steps": self.step,
                   "model_path": str(self.assets.model_path),
                   "wall_s": round(wall, 2), "wandb_dir": str(logger.wandb_dir) if logger.wandb_dir else None}
        try:
            summary["plot"] = str(plot_run({self.run_dir.name: self.run_dir}, self.run_dir / "curves.png"))
        except Exception as exc:  # plotting never fails a finished run
            summary["plot_error"] = repr(exc)
        for ref in list(gen_inflight) + list(score_inflight):
            ray.cancel(ref, force=False)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # ---------------------------------------------------------------- pieces
    def _fetch(self, ref: Any, group: _Group, *, role: str, index: int) -> tuple[list[Trajectory] | None, bool]:
        """(trajectories, died) of a finished generation/scoring task.

        A dead actor (Ray restarts it) returns (None, True): the caller re-submits the work once the
        actor is back (`_poll_recovering`), without counting an attempt against the prompt. A task
        that raised re-queues its prompt; a prompt failing `MAX_GROUP_ATTEMPTS` times is skipped and
        counted, so one bad prompt never stops a long run.
        """
        import ray

        who = f"{role}-{index}"
        try:
            return [Trajectory.from_dict(d).validate() for d in ray.get(ref)], False
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self.counters[K.RESTARTS] += 1 if (role, index) not in self.recovering else 0
            self._mark_recovering(role, index)
            print(f"[tepo-ray] {who} unavailable ({type(exc).__name__}); group {group.group_id} will be retried")
            return None, True
        except (ray.exceptions.RayTaskError, RecordError) as exc:
            self._retry(group, f"{who} failed: {str(exc).splitlines()[0][:300]}")
            return None, False

    def _actors(self, role: str) -> list[Any]:
        return self.generators if role == "generator" else self.scorers

    def _pick(self, role: str, start: int) -> int | None:
        """The next actor of `role` (round robin from `start`) that is not restarting."""
        n = len(self._actors(role))
        for k in range(n):
            i = (start + k) % n
            if (role, i) not in self.recovering:
                return i
        return None

    def _mark_recovering(self, role: str, index: int) -> None:
        if (role, index) not in self.recovering:
            self.recovering[(role, index)] = (self._actors(role)[index].ready.remote(), time.monotonic())

    def _poll_recovering(self) -> None:
        """Bring restarted actors back into rotation; a generator gets the current weights first."""
        import ray

        for (role, index), (ref, since) in list(self.recovering.items()):
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayError:  # still restarting: ask again a little later
                if time.monotonic() - since > 0.5:
                    self.recovering[(role, index)] = (self._actors(role)[index].ready.remote(), time.monotonic())
                continue
            del self.recovering[(role, index)]
            if self.collective:
                # The restarted actor is a new process: every member joins the group again -- once all
                # restarting receivers are back, not once per receiver.
                if not self.recovering:
                    self._reform_and_resend()
            elif role == "generator":
                self._resend_weights(self.generators[index])
            print(f"[tepo-ray] {role}-{index} is back")

    def _retry(self, group: _Group, why: str) -> None:
        attempts = self.attempts[group.item_index] = self.attempts.get(group.item_index, 0) + 1
        if attempts >= MAX_GROUP_ATTEMPTS:
            self.counters[K.FAILED_GROUPS] += 1
            print(f"[tepo-ray] {why}; prompt {group.item_index} skipped after {attempts} attempts")
            return
        self.counters[K.RETRIED_GROUPS] += 1
        self.requeue.appendleft(group.item_index)
        print(f"[tepo-ray] {why}; group {group.group_id} re-queued (attempt {attempts + 1})")

    def _resend_weights(self, actor: Any) -> None:
        v = max(self.weight_paths)
        actor.set_weights.remote(self.weight_paths[v], v)

    def _checkpoint_extra(self, pending: list[int], *, samples_in_flight: int = 0) -> dict[str, Any]:
        """What the driver needs to continue from this checkpoint. Groups in flight are re-queued on
        restore and generated again, so their samples leave the `generated` count saved here."""
        counters = dict(self.counters)
        counters[K.SAMPLES_GENERATED] = counters.get(K.SAMPLES_GENERATED, 0) - samples_in_flight
        return {"step": self.step, "version": self.version, "cursor": self.cursor,
                "requeue": list(self.requeue) + sorted(pending), "counters": counters}

    def _finish_checkpoint(self, ref: Any, *, timeout_s: float = CHECKPOINT_WAIT_S) -> None:
        """Collect a checkpoint write. A failed write (disk full, ...) is counted and logged; the
        previous complete checkpoint stays the one a restart or `--resume` loads."""
        import ray

        if ref is None:
            return
        try:
            path = ray.get(ref, timeout=timeout_s)
            print(f"[tepo-ray] checkpoint {path}")
        except ray.exceptions.GetTimeoutError:
            self.counters[K.CHECKPOINT_FAILURES] += 1
            print(f"[tepo-ray] checkpoint write did not finish within {timeout_s:.0f}s")
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass  # the learner died: the train step that follows sees it and restores
        except ray.exceptions.RayTaskError as exc:
            self.counters[K.CHECKPOINT_FAILURES] += 1
            print(f"[tepo-ray] checkpoint at step {self.step} failed, previous checkpoint kept: "
                  f"{str(exc).strip().splitlines()[-1][:300]}")

    def _recover_learner(self, exc: Exception) -> dict[str, Any]:
        """Wait for Ray to restart the learner; its constructor restores the newest complete
        checkpoint (`actors.learner`). Returns that checkpoint's driver state, or stops the run with
        a message when there is nothing to go back to."""
        import ray

        self.counters[K.LEARNER_RESTARTS] += 1
        if len(self.plan.for_role("learner")) > 1:
            raise RuntimeError(
                f"a rank of the sharded learner group died at step {self.step} ({type(exc).__name__}); an FSDP2 "
                f"group is not restarted rank by rank. Resume the run from its last complete checkpoint: "
                f"`tepo-ray train CONFIG --resume {self.run_dir}` (trainer.checkpoint_interval="
                f"{self.cfg.trainer.checkpoint_interval})") from None
        print(f"[tepo-ray] learner died at step {self.step} ({type(exc).__name__}); waiting for its restart")
        deadline = time.monotonic() + LEARNER_RESTART_TIMEOUT_S
        while True:
            try:
                ray.get(self.learner.ready.remote(), timeout=max(deadline - time.monotonic(), 1.0))
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the learner did not come back within {LEARNER_RESTART_TIMEOUT_S:.0f}s "
                                       f"after dying at step {self.step}; see the Ray logs") from None
                time.sleep(0.5)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"the learner did not come back within {LEARNER_RESTART_TIMEOUT_S:.0f}s "
                                   f"after dying at step {self.step}; see the Ray logs") from None
        extra = ray.get(self.learner.restored.remote(), timeout=60)
        if extra is None:
            if self.step == 0:  # nothing was trained: the fresh learner is the same state
                return {"step": 0, "version": 0, "cursor": 0, "requeue": [], "counters": {}}
            raise RuntimeError(
                f"the learner actor died at step {self.step} and there is no complete checkpoint to restore "
                f"(trainer.checkpoint_interval={self.cfg.trainer.checkpoint_interval}); stopping instead of "
                f"silently restarting from version 0. Set trainer.checkpoint_interval > 0 to survive learner "
                f"restarts.")
        return extra

    def _apply_restored(self, extra: dict[str, Any]) -> None:
        """Rewind the schedule to a restored checkpoint; generators and scorers drop newer weights."""
        import ray

        restarts = self.counters[K.LEARNER_RESTARTS]
        self.step = int(extra["step"])
        self.cursor = int(extra["cursor"])
        self.requeue = collections.deque(extra.get("requeue", []))
        self.counters = collections.Counter(extra.get("counters", {}))
        self.counters[K.LEARNER_RESTARTS] = restarts
        if self.collective:  # the restarted learner is a new process: form the group again, re-send its weights
            self._form_weight_group()
            update = ray.get(self.learner.weight_update.remote(), timeout=60)
            self.version = int(update["version"])
            self.weight_update = update
            ray.get(self._publish(update), timeout=float(self.cfg.weights.timeout_s))
            return
        path, version = ray.get(self.learner.latest_weights.remote(), timeout=60)
        self.version = version
        self.weight_paths = {v: p for v, p in self.weight_paths.items() if v < version}
        self.weight_paths[version] = path
        for g in self._weight_generators():
            g.set_weights.remote(path, version, rewind=True)
        for sc in self.scorers:  # a scorer may hold a discarded timeline's weights under this number
            sc.load_weights.remote(path, version)

    def _step_metrics(self, learner_metrics: dict[str, Any], batch: list[_Group], *, step_time: float,
                      inflight: int, samples_in_flight: int = 0) -> dict[str, Any]:
        import ray

        trajs = [t for g in batch for t in g.trajectories]
        stale = [self.version - 1 - g.behaviour_version for g in batch]
        rec: dict[str, Any] = {K.STEP: self.step, K.VERSION: self.version, **learner_metrics}
        rec[K.STALENESS_MIN] = min(stale)
        rec[K.STALENESS_MEAN] = sum(stale) / len(stale)
        rec[K.STALENESS_MAX] = max(stale)
        rec[K.DROPPED_STALE] = self.counters[K.DROPPED_STALE]
        rec[K.ADMITTED] = self.counters[K.ADMITTED]
        rec[K.INFLIGHT] = inflight
        rec[K.ITEMS] = sorted(g.item_index for g in batch)
        rec[K.RESTARTS] = self.counters[K.RESTARTS]
        rec[K.RETRIED_GROUPS] = self.counters[K.RETRIED_GROUPS]
        rec[K.FAILED_GROUPS] = self.counters[K.FAILED_GROUPS]
        for key in (K.SAMPLES_GENERATED, K.SAMPLES_TRAINED, K.SAMPLES_DROPPED_STALE, K.SAMPLES_FAILED,
                    K.LEARNER_RESTARTS, K.CHECKPOINT_FAILURES):
            rec[key] = self.counters[key]
        rec[K.SAMPLES_IN_FLIGHT] = samples_in_flight
        rec[K.TIME_STEP] = step_time
        cs = call_stats(trajs, malformed_calls=self.cfg.algo.malformed_calls)
        rec[K.CALLS] = cs["calls_per_traj"]
        rec[K.MALFORMED] = cs["malformed_per_traj"]
        rec[K.MALFORMED_FRAC] = cs["malformed_fraction"]
        rec[K.DELTA_H_VALUES] = [round(x, 5) for x in cs["delta_h_values"]]
        rec[K.DELTA_H_MEAN] = cs["delta_h_mean"]
        for tool in TOOLS:
            rec[K.CALLS_BY_TOOL.format(tool=tool)] = cs["calls_by_tool"][tool]
            rec[K.DELTA_H_TOOL.format(tool=tool)] = cs["delta_h_by_tool"][tool]
            rec[K.DELTA_H_TOOL_VALUES.format(tool=tool)] = [round(x, 5) for x in cs["delta_h_values_by_tool"][tool]]
        rec[K.M_OVER_N] = cs["m_over_n"]
        rec[K.DECREASE_FRAC] = cs["decrease_fraction"]
        rewards = self._bounded_get(self.learner.last_rewards.remote(), default=[])  # computed on the learner
        if rewards:
            scores = [sc for _, sc, _ in rewards]
            rec[K.SCORE] = sum(scores) / len(scores)
            rec[K.ACCURACY] = sum(1 for x in scores if x >= 1.0) / len(scores)
            rec[K.REWARD] = sum(r for _, _, r in rewards) / len(rewards)
        for reason in ("answer", "max_turns", "max_new_tokens", "max_context", "eos", "malformed", "error"):
            rec[K.FINISH.format(reason=reason)] = sum(1 for t in trajs if t.finish_reason == reason) / len(trajs)
        rec[K.RESPONSE_LEN] = sum(t.num_generated for t in trajs) / len(trajs)
        # per-actor time and throughput
        wall = max(step_time, 1e-9)
        gen_stats = [self._bounded_get(g.stats.remote(), default=None) for g in self.generators]
        prev = getattr(self, "_prev_gen_stats", None) or [{"busy_s": 0.0, "tokens": 0} for _ in gen_stats]
        rec[K.WEIGHT_LOAD_FAILURES] = sum(int(st.get("weight_load_failures", 0)) for st in gen_stats if st)
        gen_stats = [cur if cur is not None else old for cur, old in zip(gen_stats, prev)]
        tokens = 0
        for i, (cur, old) in enumerate(zip(gen_stats, prev)):
            busy = max(cur["busy_s"] - old["busy_s"], 0.0) if cur["busy_s"] >= old["busy_s"] else cur["busy_s"]
            tokens += max(cur["tokens"] - old["tokens"], 0) if cur["tokens"] >= old["tokens"] else cur["tokens"]
            rec[K.TIME_GEN.format(actor=f"generator{i}")] = busy
            rec[K.IDLE.format(actor=f"generator{i}")] = max(0.0, 1.0 - busy / wall)
        self._prev_gen_stats = gen_stats
        rec[K.GEN_TOKENS_PER_S] = tokens / wall
        train_s = float(learner_metrics.get("learner/step_time_s", 0.0) or 0.0)
        rec[K.TIME_TRAIN] = train_s
        rec[K.IDLE.format(actor="learner")] = max(0.0, 1.0 - train_s / wall)
        trained_tokens = sum(t.num_generated for t in trajs)
        rec[K.TRAIN_TOKENS_PER_S] = trained_tokens / train_s if train_s > 0 else None
        prev_sc = getattr(self, "_prev_scorer_busy", {})
        for i, sc in enumerate(self.scorers):
            try:
                total = float(ray.get(sc.stats.remote(), timeout=STATS_TIMEOUT_S).get("total_score_time_s", 0.0))
            except Exception:  # a restarting scorer: its time shows next step
                self.counters[K.STATS_TIMEOUTS] += 1
                continue
            busy = total - prev_sc.get(i, 0.0) if total >= prev_sc.get(i, 0.0) else total
            prev_sc[i] = total
            rec[K.TIME_SCORE.format(actor=f"scorer{i}")] = busy
            rec[K.IDLE.format(actor=f"scorer{i}")] = max(0.0, 1.0 - busy / wall)
        self._prev_scorer_busy = prev_sc
        for kind, pool in self.pools.items():
            try:
                rec.update(ray.get(pool.metrics.remote(), timeout=STATS_TIMEOUT_S))
            except Exception:
                self.counters[K.STATS_TIMEOUTS] += 1
        rec[K.STATS_TIMEOUTS] = self.counters[K.STATS_TIMEOUTS]
        return rec

    def _evaluate(self, path: str | None, version: int) -> dict[str, Any]:
        """Held-out eval with the current weights: the `eval/held_out/*` keys of this step's record. A failed
        eval is reported (`eval/failed`) and training goes on. `path`: the version's weight file (file
        transport); None with the collective transport, where the eval generator and the scorers received
        the version with everyone else."""
        import ray

        from tepo_ray.evaluate import eval_record

        try:
            if path is None:
                ref = getattr(self, "_eval_weights_ref", None)
                if ref is not None:
                    ray.get(ref, timeout=float(self.cfg.weights.timeout_s))
                results, _ = self.evaluator.run({"held_out": self.assets.eval_items})
            else:
                results, _ = self.evaluator.run({"held_out": self.assets.eval_items}, weights=(path, version))
        except Exception as exc:  # eval never stops training
            print(f"[tepo-ray] eval at step {self.step} failed: {type(exc).__name__}: {str(exc)[:300]}")
            return {K.EVAL_FAILED: 1}
        return eval_record(results, step=self.step)

    def _bounded_get(self, ref: Any, *, default: Any) -> Any:
        """`ray.get` that gives up after STATS_TIMEOUT_S (counted): metrics never stall the schedule."""
        import ray

        try:
            return ray.get(ref, timeout=STATS_TIMEOUT_S)
        except Exception:
            self.counters[K.STATS_TIMEOUTS] += 1
            return default

    def shutdown(self) -> None:
        import ray

        for g in [*getattr(self, "generators", []), *([self.eval_generator] if hasattr(self, "eval_generator") else [])]:
            try:
                ray.get(g.shutdown.remote(), timeout=30)
            except Exception:
                pass
        for pool in owned_pools(self.cfg, getattr(self, "pools", {})).values():
            try:
                ray.get(pool.shutdown.remote(), timeout=30)
            except Exception:
                pass
        if getattr(self, "pg", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)


class _Progress:
    """A rich progress bar with the latest reward / score / calls / staleness."""

    def __init__(self, *, enabled: bool, total: int, start: int):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[info]}"))
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.progress.start()

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return

        def f(k: str) -> str:
            v = rec.get(k)
            return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

        info = (f"reward {f(K.REWARD)} score {f(K.SCORE)} calls {f(K.CALLS)} m/n {f(K.M_OVER_N)} "
                f"ΔH {f(K.DELTA_H_MEAN)} stale≤{rec.get(K.STALENESS_MAX)}")
        self.progress.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


def train(cfg: DictConfig, *, resume: str | None = None, address: str | None = None,
          **driver_kwargs: Any) -> dict[str, Any]:
    """Prepare assets, start actors, run the schedule; returns the run summary."""
    run_dir = resolve_run_dir(cfg, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir)
    assets = prepare_data(cfg, progress=cfg.logging.progress)
    driver = Driver(cfg, run_dir=run_dir, assets=assets, resume=bool(resume), address=address, **driver_kwargs)
    try:
        driver.start()
        return driver.run()
    finally:
        driver.shutdown()
