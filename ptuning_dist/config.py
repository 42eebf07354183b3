"""The one typed config tree of a run: model, prompt, data, train, parallel.

Loaded from a YAML/JSON file (``--config``), overridden by launcher flags, validated field by
field in ``__post_init__`` (errors name the field, e.g. ``train.lr``) and as a whole against the
world size in ``RunConfig.check_layout``.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ptuning_dist.errors import ConfigError


def _require(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {msg}")


@dataclass
class ModelConfig:
    path: str | None = None
    """A local Hugging Face model directory (model and tokenizer). None: the embedded tiny
    GPT-2 default, built once into ``<output_dir>/default_backbone``."""
    dtype: str = "float32"
    """The frozen backbone's dtype: float32, bfloat16 or float16. The encoder is always fp32."""
    backend: str = "hf"
    """'hf' (the Hugging Face model as it is) or 'megatron' (imported into a megatron-core GPTModel,
    GPT-2 and LLaMA families; needed for parallel.tp > 1)."""

    splice: str = "fused"
    """The embedding splice: 'fused' (``ptuning::splice``: one pass, a C++ kernel on CPU built on first
    use, Triton on CUDA) or 'reference' (lookup, then insert the prompt rows: the oracle). Same bits."""

    def __post_init__(self):
        _require(self.backend in ("hf", "megatron"), "model.backend", f"{self.backend!r} is not hf or megatron")
        _require(self.splice in ("fused", "reference"), "model.splice", f"{self.splice!r} is not fused or reference")
        _require(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
                 f"{self.dtype!r} is not float32, bfloat16 or float16")


@dataclass
class PromptConfig:
    encoder: str = "lstm"
    """Prompt encoder: 'lstm' (the paper's: 2-layer biLSTM + 2-layer ReLU MLP), 'mlp', 'embedding'."""
    template: str | None = None
    """Template with [P]/[P*n] slots, {fields}, anchors and [MASK]; None: the task's default."""
    lstm_dropout: float = 0.0
    """Dropout between the two LSTM layers (the paper's code: 0)."""

    def __post_init__(self):
        _require(self.encoder in ("lstm", "mlp", "embedding"), "prompt.encoder",
                 f"{self.encoder!r} is not lstm, mlp or embedding")
        _require(0.0 <= self.lstm_dropout < 1.0, "prompt.lstm_dropout", "must be in [0, 1)")


@dataclass
class DataConfig:
    task: str = "default"
    """default (bundled tiny LAMA), lama, rte, cb, boolq or wic."""
    data_dir: str | None = None
    """The task's data folder; None: the bundled set (default) or ../shared/data/fewglue/<TASK>."""
    relations: list[str] | None = None
    """LAMA: the relations to train and evaluate (None: every relation in relations.jsonl)."""
    allowed_vocab: str | None = None
    """LAMA: restrict predictions to 'objects' (all objects in the data), a word-list file
    (the paper's LAMA-29k/34k) or 'full' (the whole vocabulary); None: the task's default
    ('objects' for the bundled default task, 'full' for lama)."""
    max_seq_len: int = 256
    """Rows longer than this lose tokens from their longest input field."""
    packing: str = "auto"
    """'on': each micro-batch is packed (data/packing.py): the rows' shared prefix (the leading
    prompt tokens and anchors every row has) computed once, several rows per sequence of at most
    max_seq_len positions, no padding; same loss, less work. 'off': rows padded to the longest
    of their micro-batch. 'auto' (default): 'on' with the hf backend, 'off' with megatron (its
    attention takes no packed mask yet)."""
    train_split: str = "train"
    eval_split: str = "dev"
    """Splits (LAMA: file names in each relation folder; SuperGLUE: train, dev32, val)."""

    def __post_init__(self):
        _require(self.max_seq_len >= 8, "data.max_seq_len", f"must be >= 8, got {self.max_seq_len}")
        _require(self.packing in ("auto", "on", "off"), "data.packing", f"{self.packing!r} is not auto, on or off")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Where metrics.jsonl, eval.json, the encoder and the exported prompt table go."""
    max_steps: int = 300
    """Optimizer steps (each of global_batch_size samples)."""
    lr: float = 5e-3
    """AdamW learning rate of the encoder."""
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear warm-up, then linear decay to 0 at max_steps."""
    max_grad_norm: float = 1.0
    """Clip the encoder's gradient norm (0: off)."""
    micro_batch_size: int = 16
    """Samples per forward on one rank."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks: micro_batch_size x accumulation x dp. None:
    micro_batch_size x dp (no accumulation). Set it to keep the same batch on any number of ranks."""
    seed: int = 1234
    log_every: int = 10
    """Log a metrics line (and sync the host for the loss) every N steps."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    eval_batch_size: int = 32
    save_every: int = 0
    """Write a checkpoint every N steps (0: only at the end). Checkpoints hold only what trains."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    resume: str | None = None
    """'auto' (the newest good checkpoint in output_dir, if any) or a checkpoint directory."""

    def __post_init__(self):
        _require(self.save_every >= 0 and self.keep_checkpoints >= 1, "train.save_every/keep_checkpoints",
                 "save_every must be >= 0 and keep_checkpoints >= 1")
        for name in ("max_steps", "micro_batch_size", "log_every", "eval_batch_size"):
            _require(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.global_batch_size is None or self.global_batch_size >= 1, "train.global_batch_size",
                 f"must be >= 1, got {self.global_batch_size}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.eval_every >= 0 and self.warmup_steps >= 0, "train.eval_every/warmup_steps", "must be >= 0")


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    ds_config: str | None = None
    """A DeepSpeed JSON (ds_configs/zero3.json ...): ZeRO partitioning of the frozen backbone and
    its dtype. Its batch sizes may be "auto"; values contradicting this config are errors."""
    fsdp2: bool = False
    """Partition the frozen backbone with torch FSDP2 over the data-parallel group (instead of a
    DeepSpeed ZeRO-3 config); works with both backends and with TP."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward (about one extra forward)."""
    dist_timeout_s: float = 600.0
    """Bound on every collective: a dead rank makes the others fail instead of hanging."""

    def __post_init__(self):
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
        _require(not (self.data.packing == "on" and self.model.backend == "megatron"), "data.packing",
                 "'on' needs model.backend = hf (megatron's attention takes no packed mask yet); use auto or off")

    @property
    def pack_to(self) -> int | None:
        """The packed sequence length (collate's ``pack_to``), or None when micro-batches are padded."""
        return self.data.max_seq_len if self.data.packing != "off" and self.model.backend == "hf" else None

    def check_layout(self, world_size: int) -> tuple[int, int]:
        """(dp, accumulation) for this world size: tp*pp*dp == world and
        micro*accum*dp == global batch, or a ConfigError naming the fields. An unset global batch
        is resolved here to micro x dp."""
        tp, pp = self.parallel.tp, self.parallel.pp
        _require(world_size % (tp * pp) == 0, "parallel.tp/pp",
                 f"tp*pp = {tp * pp} does not divide the world size {world_size}")
        dp = world_size // (tp * pp)
        t = self.train
        per_step = t.micro_batch_size * dp
        if t.global_batch_size is None:
            t.global_batch_size = per_step
        _require(t.global_batch_size % per_step == 0, "train.global_batch_size",
                 f"{t.global_batch_size} is not micro_batch_size ({t.micro_batch_size}) x dp ({dp}) x an accumulation count")
        return dp, t.global_batch_size // per_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, typ, name: str):
    """Check/convert a value from a file or flag to the field's declared type."""
    args = typing.get_args(typ)
    if value is None:
        _require(type(None) in args, name, "may not be null")
        return None
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        _require(isinstance(value, list), name, f"expected a list, got {value!r}")
        return [str(v) for v in value]
    if base is bool:
        if isinstance(value, str):
            _require(value.lower() in ("true", "false", "1", "0"), name, f"expected true/false, got {value!r}")
            return value.lower() in ("true", "1")
        return bool(value)
    try:
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {base.__name__}, got {value!r}") from None


def from_dict(d: dict, overrides: dict | None = None) -> RunConfig:
    """Build a RunConfig from nested dicts plus dotted overrides ({'train.lr': 1e-3}).
    Unknown sections or fields are errors naming them."""
    d = {k: dict(v or {}) for k, v in (d or {}).items()}
    hints = typing.get_type_hints(RunConfig)
    for section in d:
        _require(section in hints, section, f"unknown config section; known: {sorted(hints)}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        d.setdefault(section, {})[key] = value
    built = {}
    for section, cls in hints.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        ftypes = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in d.get(section, {}).items():
            _require(key in fields, f"{section}.{key}", f"unknown field; known: {sorted(fields)}")
            kwargs[key] = _coerce(value, ftypes[key], f"{section}.{key}")
        built[section] = cls(**kwargs)
    return RunConfig(**built)


def load_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - report any parse error with the file name
        raise ConfigError(f"--config {path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections")
    return data
