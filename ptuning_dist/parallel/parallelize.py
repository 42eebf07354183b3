"""Every parallel wrapper, applied from outside the model, in one documented order.

The order (torchtitan's ``parallelize_*``, extended by what loading needs):

0. ``ParallelPlan.from_config(cfg)``, before any process group: the layout against the world size
   (``planning/layout.py``'s rules, the model's too when its path is given), the DeepSpeed JSON
   reconciled with the run config (``ds_config.py``), the combinations that are not built refused.
   A bad layout fails at once, on every rank, naming the field.
1. ``D = plan.start()``: the process group (``launch.py``: deepspeed, torchrun, mpirun or srun
   discovery), megatron's TP x PP x DP groups (the megatron import needs them), and the host heap
   policy (``heap.py``; before anything large is read).
2. ``with plan.loading():`` the backbone is built and frozen. A megatron stage is imported as this
   rank's TP shard of its layers, read shard-wise (``backbone/megatron_import.py``). An HF model
   that will be partitioned (``plan.fill``: ZeRO-3 or FSDP2 at dp > 1, safetensors on disk) is
   built empty: under ``zero.Init`` (``HfDeepSpeedConfig`` alive) or on the meta device; any other
   HF model is read whole by ``from_pretrained`` (what it holds).
3. ``parallelize(model, plan)``, on the built model:
   a. activation checkpointing per transformer block (``checkpointing.py``): before sharding, so
      that what is sharded are the wrapped blocks;
   b. the frozen part (``model.frozen``) partitioned over the data-parallel group: a partition-only
      ZeRO-3 engine (``zero.py``; a megatron stage with ``compat/deepspeed_megatron.py``'s fixes) or
      FSDP2 (``fsdp.py``); the encoder stays outside, replicated;
   c. the pipeline schedule at pp > 1 (``pipeline.py``): last, since it drives the wrapped,
      sharded stage.
   It returns one ``Parallelized``: the engine, the schedule, the per-step gather-and-hold of the
   weights used outside their modules (``hold``), the release after a step's backwards
   (``release``), the heap policy and the data-parallel group.

The model code (``model.py``, ``backbone/``, ``prompt/``, ``ops/``) knows only whether it is a first
and/or last pipeline stage.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from ptuning_dist.config import RunConfig
from ptuning_dist.errors import ConfigError
from ptuning_dist.parallel import launch
from ptuning_dist.parallel.ds_config import ds_settings, load_ds_config, zero_stage
from ptuning_dist.parallel.heap import HostHeap


@dataclass
class ParallelPlan:
    """The layout of a run, checked before any process group (step 0)."""

    cfg: RunConfig
    dp: int
    accumulation: int
    ds_cfg: dict | None  # the DeepSpeed config to initialise with (its "auto" fields filled)
    heap: HostHeap | None = None  # set by start()
    device: object = None  # set by start()
    load_report: dict | None = None  # set by parallelize() when it filled partitions

    @classmethod
    def from_config(cls, cfg: RunConfig, world: int | None = None) -> "ParallelPlan":
        p = cfg.parallel
        if (p.tp > 1 or p.pp > 1) and cfg.model.backend != "megatron":
            raise ConfigError(f"parallel.tp = {p.tp}, parallel.pp = {p.pp}: tensor and pipeline parallelism need "
                              "model.backend = megatron (--backend megatron)")
        if p.fsdp2 and p.ds_config:
            raise ConfigError("parallel.fsdp2 and parallel.ds_config both partition the backbone; choose one")
        if cfg.model.backend == "megatron" and cfg.model.path is not None:
            check_megatron_model(cfg.model.path, p.tp, p.pp)
        world = launch.env_world()[1] if world is None else world
        dp, accum = cfg.layout(world)
        ds_cfg = None
        if p.ds_config:
            ds_cfg, cfg.model.dtype = load_ds_config(p.ds_config, cfg, world)
        return cls(cfg, dp, accum, ds_cfg)

    @property
    def megatron(self) -> bool:
        return self.cfg.model.backend == "megatron"

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_cfg)

    @property
    def partitioned(self) -> bool:
        """The frozen weights are partitioned over more than one rank (ZeRO-3 or FSDP2 at dp > 1)."""
        return self.dp > 1 and (self.zero_stage == 3 or self.cfg.parallel.fsdp2)

    def start(self) -> launch.Dist:
        """Step 1: the process groups and the host heap policy."""
        p = self.cfg.parallel
        D = launch.init(need_group=self.ds_cfg is not None or self.megatron or p.fsdp2, timeout_s=p.dist_timeout_s)
        if self.megatron:
            launch.init_model_parallel(p.tp, p.pp)
        self.heap = HostHeap(p.host_malloc, D.device, self.partitioned)
        self.device = D.device
        return D

    def fill(self, model_dir) -> str | None:
        """How the HF backbone at ``model_dir`` is loaded shard-wise: "zero3" or "fsdp2" (built
        empty, its partitions filled after sharding), or None (``from_pretrained`` reads it: not
        partitioned, the megatron backend, or no safetensors to slice)."""
        from ptuning_dist.backbone.safetensors_io import has_safetensors

        if self.megatron or not self.partitioned or not has_safetensors(model_dir):
            return None
        return "fsdp2" if self.cfg.parallel.fsdp2 else "zero3"

    def loading(self):
        """Step 2: the context the backbone loads in."""
        if self.zero_stage == 3 and not self.megatron:
            return _hf_zero3_loading(self.ds_cfg)
        return nullcontext()


@contextmanager
def _hf_zero3_loading(ds_cfg: dict):
    from ptuning_dist.parallel.zero import hf_zero3_context

    keep = hf_zero3_context(ds_cfg)  # noqa: F841 - alive while loading: from_pretrained partitions as it reads
    yield


def check_megatron_model(model_dir, tp: int, pp: int) -> None:
    """The megatron backend's rules, from ``config.json`` alone (before any process group): a family
    with an importer, and TP/PP dividing its heads, key/value groups, FFN width and layers."""
    from pathlib import Path

    from ptuning_dist.backbone.families import family
    from ptuning_dist.config import read_json
    from ptuning_dist.planning.layout import check_model

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.path: {model_dir} is not a Hugging Face model directory (no config.json)")
    cfg = read_json(path, "model.path")
    check_model(family(cfg.get("model_type"), need="megatron", where=str(path)).shape(cfg), tp, pp, model=str(path))


@dataclass
class Parallelized:
    """What ``parallelize`` made of the model: what the recipe's step calls."""

    engine: object | None  # the partition-only DeepSpeed engine over model.frozen (ZeRO), else None
    pipeline: object | None  # parallel.pipeline.PipelineSchedule at pp > 1, else None
    heap: HostHeap
    dp_rank: int
    dp: int
    dp_group: object  # None: the whole world
    zero3: bool
    external: list  # the backbone's external weights: gathered once per step under ZeRO-3
    held: list  # what a step holds gathered: ``external`` ('layer'), or every frozen weight ('step')
    gather: str = "layer"  # parallel.zero3_gather, resolved (zero.choose_gather)
    gather_why: str | None = None  # the resolution, for the run's log

    def hold(self):
        """A context in which the step's held weights stay gathered: once per step and per
        evaluation, not once per forward (ZeRO-3 only). 'layer': the weights used outside their
        modules (embedding table, head, ...); 'step': the whole stage, so the layers' per-forward
        and per-backward gathers find their weights there (costs: held for the whole step, as the
        memory model counts either way)."""
        from ptuning_dist.parallel.zero import held_for_step

        return held_for_step(self.engine if self.zero3 else None, self.held)

    def release(self) -> None:
        """After a step's backwards: ZeRO-3 re-partitions what a recomputed block left gathered."""
        if self.zero3:
            self.engine.optimizer.release_backward_leftovers()


def _agree_on_gather(gather: str, dp_group, device) -> str:
    """'step' only if every DP peer chose it (the step's gathers are collectives over the group: a
    peer with less memory, say, must not leave the others waiting in a gather it never starts)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(gather == "step")], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=dp_group)
    return "step" if int(flag) else "layer"  # host sync: once, at set-up


def parallelize(model, plan: ParallelPlan, model_dir=None) -> Parallelized:
    """Step 3 on a built, frozen ``PTuningModel``: checkpoint wrapping -> partitioning -> pipeline,
    then ZeRO-3's gather policy (``parallel.zero3_gather``; ``model_dir``: the backbone's config.json
    for the memory model)."""
    from ptuning_dist.parallel.checkpointing import apply_activation_checkpointing

    p = plan.cfg.parallel
    dp_rank, dp, dp_group = launch.data_parallel()  # TP replicas and pipeline stages share a DP rank
    if p.activation_checkpointing:
        apply_activation_checkpointing(model.backbone)
    engine = None
    if plan.ds_cfg is not None:
        from ptuning_dist.parallel.zero import shard_frozen

        engine = shard_frozen(model, plan.ds_cfg, plan.megatron)
    if p.fsdp2:
        from ptuning_dist.parallel.fsdp import shard_frozen_fsdp2

        shard_frozen_fsdp2(model, dp_group)
    unfilled = getattr(model.backbone, "unfilled", None)  # an HF backbone built empty by plan.fill's choice
    if unfilled is not None:
        from ptuning_dist.parallel.shardwise import fill_partitions

        plan.load_report = fill_partitions(model.backbone, unfilled == "zero3", plan.device)
        model.backbone.unfilled = None
    pipeline = None
    if p.pp > 1:
        from ptuning_dist.parallel.pipeline import PipelineSchedule

        pipeline = PipelineSchedule(model)
    external = model.backbone.external_weights()
    held, gather, why = external, "layer", None
    if plan.zero_stage == 3 and dp > 1:
        from ptuning_dist.parallel.zero import choose_gather

        stage = 0
        if p.pp > 1:
            from megatron.core import parallel_state as ps

            stage = ps.get_pipeline_model_parallel_rank()
        encoder_numel = sum(q.numel() for q in model.prompt.parameters()) if model.prompt is not None else 0
        offload = ds_settings(plan.ds_cfg, str(p.ds_config)).offload
        gather, why = choose_gather(p.zero3_gather, model.frozen, plan.cfg, model_dir, plan.device, encoder_numel,
                                    stage, offload)
        gather = _agree_on_gather(gather, dp_group, plan.device)
        if gather == "step":
            held = list({id(q): q for q in [*external, *model.frozen.parameters()]}.values())
    return Parallelized(engine, pipeline, plan.heap, dp_rank, dp, dp_group, plan.zero_stage == 3, external, held,
                        gather, why)
