"""The one typed config tree of a run: model, prompt, data, train, parallel.

Loaded from a YAML/JSON file (``--config``), overridden by launcher flags, validated field by
field (errors name the field, e.g. ``train.lr``) and as a whole against the world size in
``RunConfig.layout``. Every field's docstring is its ``--help`` text: the flags of every entry point
are generated from these classes (``ptuning_dist.cli.args``), so a new field is a new flag.

Choices are ``Literal`` types, the one place they are written: the config checks them, the
``--help`` lists them, and the modules that branch on them read them from here.
Reading values into it (types, choices, files): ``config_values.py``. Importing this module does not
import torch.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ptuning_dist.config_values import (_optional, _require, choices, coerce, field_docs, literal_choices,  # noqa: F401
                                        load_file, one_of, read_json)

Backend = Literal["hf", "megatron"]
Splice = Literal["fused", "reference"]
Dtype = Literal["float32", "bfloat16", "float16"]
EncoderKind = Literal["lstm", "mlp", "embedding"]
Sharing = Literal["per_group", "shared"]
Batching = Literal["mixed", "by_group"]
LrSchedule = Literal["linear", "constant"]
TaskName = Literal["default", "lama", "rte", "cb", "boolq", "wic", "copa", "wsc", "multirc", "record"]
Packing = Literal["auto", "on", "off"]
HostMalloc = Literal["auto", "mmap", "trim", "off"]
ZeroGather = Literal["auto", "layer", "step"]


class Section:
    """A config section: ``Literal`` fields are checked against their choices, then ``check()``."""

    name: ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            typ = hints[f.name]
            allowed = literal_choices(typ)
            value = getattr(self, f.name)
            if allowed is not None and not (value is None and _optional(typ)):
                _require(value in allowed, f"{self.name}.{f.name}", f"{value!r} is not {one_of(allowed)}")
        self.check()

    def check(self) -> None:
        """Rules across this section's fields (ranges, combinations)."""


@dataclass
class ModelConfig(Section):
    name: ClassVar[str] = "model"
    path: str | None = field(default=None, metadata={"flag": "model"})
    """A local Hugging Face model directory (model and tokenizer). None: the embedded tiny GPT-2
    default, built once into <output_dir>/default_backbone."""
    dtype: Dtype = "float32"
    """The frozen backbone's dtype. The encoder is always fp32. Under --ds_config the JSON's
    bf16/fp16 section decides."""
    backend: Backend = "hf"
    """'hf' (the Hugging Face model as it is) or 'megatron' (imported into a megatron-core GPTModel;
    needed for parallel.tp/pp > 1)."""
    splice: Splice = "fused"
    """The embedding splice: 'fused' (ptuning::splice: one pass, a C++ kernel on CPU built on first
    use, Triton on CUDA) or 'reference' (lookup, then insert the prompt rows: the oracle). Same bits."""


@dataclass
class PromptConfig(Section):
    name: ClassVar[str] = "prompt"
    encoder: EncoderKind = "lstm"
    """Prompt encoder: 'lstm' (the paper's: 2-layer biLSTM + 2-layer ReLU MLP), 'mlp', or
    'embedding' (a plain trainable table)."""
    template: str | None = None
    """Template with [P]/[P*n] prompt slots, {fields}, literal anchor words and [MASK]; None: the
    task's default."""
    lstm_dropout: float = 0.0
    """Dropout between the two LSTM layers (the paper's code: 0)."""
    sharing: Sharing = "per_group"
    """'per_group': one prompt (its own encoder and table rows) per LAMA relation or per task, as the
    paper learns them, all trained in one run; 'shared': one prompt for every row."""

    def check(self):
        _require(0.0 <= self.lstm_dropout < 1.0, "prompt.lstm_dropout", "must be in [0, 1)")


@dataclass
class DataConfig(Section):
    name: ClassVar[str] = "data"
    task: str = "default"
    """The task: 'default' (the bundled tiny LAMA set), 'lama' (a LAMA-layout folder), a FewGLUE task
    (rte, cb, boolq, wic, copa, wsc, multirc, record), or several FewGLUE tasks comma-separated
    ('rte,cb,boolq'): one run, each task with its own prompt, template and verbalizer."""
    data_dir: str | None = None
    """The task's data folder; None: the bundled set (default) or ../shared/data/fewglue/<TASK>."""
    relations: list[str] | None = None
    """LAMA: the relations to train and evaluate, comma-separated (None: every relation in
    relations.jsonl)."""
    allowed_vocab: str | None = None
    """LAMA: restrict predictions to 'objects' (all objects in the data), a word-list file (the
    paper's LAMA-29k/34k) or 'full' (the whole vocabulary); None: the task's default ('objects' for
    the bundled default task, 'full' for lama)."""
    multi_token: bool = False
    """LAMA: score every object of the relation token by token (objects of several tokens then
    count), instead of one head over single-token ids (the paper's setting, the default)."""
    candidate_score: Literal["sum", "mean"] = "sum"
    """Answers of several tokens (COPA, a verbalizer word the tokenizer splits): a candidate's score
    is the sum (or the mean) of its tokens' log-probabilities given the context."""
    max_seq_len: int = 256
    """Rows longer than this lose tokens from their longest input field."""
    packing: Packing = "auto"
    """'on': each forward is packed (data/packing.py): the rows' shared prefix (the leading prompt
    tokens and anchors every row has) computed once, several rows per sequence of at most
    max_seq_len positions, no padding; same loss, less work; both backends, any TP and PP (under
    PP a step's packed forwards are padded to one shape). 'off': rows padded to the longest of
    their micro-batch. 'auto': 'on'."""
    batching: Batching = "mixed"
    """'mixed': each step samples from all rows; 'by_group': each step's global batch comes from one
    prompt group (groups take turns, each with its own shuffled stream), as separate per-relation
    runs would see their rows; packed forwards then keep the group's prompt prefix shared."""
    train_split: str = "train"
    """The training split (LAMA: a file name in each relation folder; SuperGLUE: train)."""
    eval_split: str = "dev"
    """The split evaluated during and after training, and the one best-on-dev selection reads (LAMA:
    a file name; SuperGLUE: dev32 or val)."""
    test_split: str | None = "test"
    """The held-out split the selected tables are finally evaluated on (LAMA: a file name; SuperGLUE:
    'test' reads val.jsonl); skipped when the task has no such split or it is the eval_split. None: none."""

    def check(self):
        _require(self.max_seq_len >= 8, "data.max_seq_len", f"must be >= 8, got {self.max_seq_len}")
        names = self.tasks
        for t in names:
            _require(t in choices(TaskName), "data.task", f"{t!r} is not {one_of(choices(TaskName))}")
        _require(len(set(names)) == len(names), "data.task", f"a task is named twice in {self.task!r}")
        if len(names) > 1:
            _require(not {"default", "lama"} & set(names), "data.task",
                     f"{self.task!r}: only FewGLUE tasks combine in one run (LAMA's groups are its relations)")
            _require(self.data_dir is None, "data.data_dir",
                     "give none with several tasks (each reads ../shared/data/fewglue/<TASK>)")

    @property
    def tasks(self) -> list[str]:
        """The task names of ``task`` (one, or several comma-separated)."""
        return [t.strip() for t in str(self.task).split(",")] if str(self.task).strip() else [""]


@dataclass
class TrainConfig(Section):
    name: ClassVar[str] = "train"
    output_dir: str = "runs/default"
    """Where metrics.jsonl, eval.json, checkpoints, the encoder and the exported prompt table go."""
    max_steps: int | None = None
    """Optimizer steps (each of global_batch_size samples). None: from train.epochs, or 300 when that
    is unset too. The run records the resolved number in run_config.json."""
    epochs: float | None = None
    """Passes over the training rows instead of max_steps: max_steps = ceil(epochs x rows /
    global_batch_size), counted on the global sample stream (the same on any number of ranks)."""
    lr: float = 5e-3
    """AdamW learning rate of the encoders."""
    lr_schedule: LrSchedule = "linear"
    """'linear': warm-up over warmup_steps, then linear decay to 0 at max_steps; 'constant': warm-up,
    then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay of the encoders."""
    warmup_steps: int = 0
    """Linear warm-up steps (see lr_schedule)."""
    max_grad_norm: float = 1.0
    """Clip each prompt group's gradient norm on its own, as separate runs would (0: off)."""
    micro_batch_size: int = 16
    """Samples per forward on one rank (packed forwards are filled up to as many positions)."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks: micro_batch_size x accumulation x dp. None:
    micro_batch_size x dp (no accumulation). Set it to keep the same batch on any number of ranks."""
    seed: int = 1234
    """Seeds the encoder's initial weights and the sample order."""
    log_every: int = 10
    """Log a metrics line (and sync the host for the loss) every N steps."""
    eval_every: int = 0
    """Evaluate on data.eval_split every N steps (0: only at the end, unless eval_every_epoch)."""
    eval_every_epoch: bool = False
    """Evaluate on data.eval_split after every epoch (ceil(rows / global_batch_size) steps)."""
    select_best: bool = True
    """With evaluations during training: export (and evaluate on data.test_split) each prompt
    group's table from its best evaluation on data.eval_split, not the last step's."""
    patience: int = 0
    """Stop early after this many evaluations in a row in which no prompt group improved (0: never)."""
    eval_batch_size: int = 32
    """Samples per evaluation forward on one rank."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end). Checkpoints hold only what trains."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    resume: str | None = None
    """'auto' (the newest good checkpoint in output_dir, if any) or a checkpoint directory."""

    def check(self):
        _require(self.save_every >= 0 and self.keep_checkpoints >= 1, "train.save_every/keep_checkpoints",
                 "save_every must be >= 0 and keep_checkpoints >= 1")
        for name in ("micro_batch_size", "log_every", "eval_batch_size"):
            _require(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.max_steps is None or self.epochs is None, "train.max_steps/epochs",
                 f"give one of them, not both (max_steps {self.max_steps}, epochs {self.epochs})")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        _require(self.epochs is None or 0 < self.epochs < float("inf"), "train.epochs",
                 f"must be a finite number > 0, got {self.epochs}")
        _require(self.patience >= 0, "train.patience", f"must be >= 0, got {self.patience}")
        _require(self.global_batch_size is None or self.global_batch_size >= 1, "train.global_batch_size",
                 f"must be >= 1, got {self.global_batch_size}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        _require(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.eval_every >= 0 and self.warmup_steps >= 0, "train.eval_every/warmup_steps", "must be >= 0")


@dataclass
class ParallelConfig(Section):
    name: ClassVar[str] = "parallel"
    tp: int = 1
    """Tensor-parallel size (model.backend = megatron)."""
    pp: int = 1
    """Pipeline-parallel size (model.backend = megatron; megatron-core's 1F1B schedule)."""
    ds_config: str | None = None
    """A DeepSpeed JSON (ds_configs/zero3.json ...): ZeRO partitioning of the frozen backbone and its
    dtype. Its batch sizes may be "auto"; values contradicting this config are errors."""
    fsdp2: bool = False
    """Partition the frozen backbone with torch FSDP2 over the data-parallel group (instead of a
    DeepSpeed ZeRO-3 config); works with both backends and with TP and PP."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward (about one extra forward)."""
    dist_timeout_s: float = 600.0
    """Bound on every collective, in seconds: a dead rank makes the others fail instead of hanging."""
    host_malloc: HostMalloc = "auto"
    """CPU runs: how glibc's heap is kept from growing under ZeRO-3's per-layer gathers. 'auto':
    'trim' when the frozen weights are partitioned over ranks, else 'off'; 'trim': malloc_trim
    after every step; 'mmap': buffers >= 1 MiB mmapped (leanest, slowest); 'off': glibc's defaults
    (fastest, ~2x the memory under ZeRO-3). See parallel/heap.py."""
    zero3_gather: ZeroGather = "auto"
    """ZeRO-3 (dp > 1): 'layer': DeepSpeed's own per-module gathers, each layer's weights gathered
    for every forward and again for every backward, released after each (the least memory);
    'step': the frozen weights never change, so the whole stage is gathered once when a step
    starts, kept across all its forwards and backwards, and re-partitioned when it ends (one
    gather per step instead of two per layer and micro-batch; costs the stage's full weights for
    the step); 'auto': 'step' when the memory model's step peak with the stage gathered fits 80%
    of the device's memory (CPU: the host's / local ranks), else 'layer' (and 'layer' under
    offload_param). Same numerics in all."""

    def check(self):
        _require(self.dist_timeout_s > 0, "parallel.dist_timeout_s", "must be > 0")
        _require(self.tp >= 1 and self.pp >= 1, "parallel.tp/pp", "must be >= 1")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if len(self.data.tasks) > 1:
            _require(self.prompt.template is None, "prompt.template",
                     "give none with several tasks: each task uses its own template")
            _require(self.prompt.sharing == "per_group", "prompt.sharing",
                     "several tasks have several templates: each needs its own prompt (per_group)")

    @property
    def pack_to(self) -> int | None:
        """The packed sequence length (collate's ``pack_to``), or None when micro-batches are padded."""
        return self.data.max_seq_len if self.data.packing != "off" else None

    def resolve_steps(self, n_train: int) -> int:
        """Fix train.max_steps from train.epochs (or the 300-step default) once the training rows and
        the global batch are known (after ``layout``); returns the steps of one epoch."""
        t = self.train
        per_epoch = -(-n_train // t.global_batch_size)
        if t.max_steps is None:
            t.max_steps = max(1, math.ceil(t.epochs * n_train / t.global_batch_size)) if t.epochs else 300
        return per_epoch

    def layout(self, world_size: int) -> tuple[int, int]:
        """(dp, accumulation) for this world size (``planning.layout``'s rules, naming this config's
        fields). An unset global batch is resolved here to micro x dp."""
        from ptuning_dist.planning.layout import RUN_NAMES, check_layout

        t = self.train
        lay = check_layout(None, self.parallel.tp, self.parallel.pp, world_size, t.micro_batch_size,
                           t.global_batch_size, RUN_NAMES, world=f"the world size {world_size}")
        t.global_batch_size = lay.global_batch
        return lay.dp, lay.accumulation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type[Section]] = typing.get_type_hints(RunConfig)


def from_dict(d: dict, overrides: dict | None = None) -> RunConfig:
    """Build a RunConfig from nested dicts plus dotted overrides ({'train.lr': 1e-3}).
    Unknown sections or fields are errors naming them."""
    d = {k: dict(v or {}) for k, v in (d or {}).items()}
    for section in d:
        _require(section in SECTIONS, section, f"unknown config section; known: {sorted(SECTIONS)}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        d.setdefault(section, {})[key] = value
    built = {}
    for section, cls in SECTIONS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        ftypes = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in d.get(section, {}).items():
            _require(key in fields, f"{section}.{key}", f"unknown field; known: {sorted(fields)}")
            kwargs[key] = coerce(value, ftypes[key], f"{section}.{key}")
        built[section] = cls(**kwargs)
    return RunConfig(**built)
