"""What a run is built from, in a fixed order: tokenizer and task -> backbone (loaded and frozen
before anything wraps it) -> prompt encoder (seeded) -> model.

The parallel wrappers (checkpoint wrapping, ZeRO-3 / FSDP2, the pipeline schedule) are applied to
the objects built here from outside, by ``ptuning_dist.parallel.parallelize``; the megatron
backbone only reads its TP/PP coordinates while importing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ptuning_dist.backbone.hf import DTYPES, HFBackbone, fingerprint
from ptuning_dist.config import RunConfig
from ptuning_dist.data.collate import Candidates, Example, build_candidates, encode_rows
from ptuning_dist.data.tasks import Task, build_task
from ptuning_dist.data.tokenizer import PieceTokenizer
from ptuning_dist.errors import ConfigError
from ptuning_dist.model import PTuningModel
from ptuning_dist.prompt.batched import PromptEncoders
from ptuning_dist.prompt.groups import SHARED, PromptGroups
from ptuning_dist.prompt.template import Template


@dataclass
class Run:
    cfg: RunConfig
    model_path: Path
    backbone_hash: str
    tok: PieceTokenizer
    task: Task
    template: Template
    cands: Candidates
    backbone: nn.Module | None  # HFBackbone or MegatronBackbone (backbone/base.py); None: not loaded
    device: torch.device
    hidden_size: int = 0
    groups: PromptGroups | None = None  # the prompt groups (prompt/groups.py): rows of the stacked table
    templates: dict | None = None  # row group -> its Template (several tasks: each its own)

    @property
    def ident(self) -> dict:
        """What a checkpoint or prompt table of this run is only valid with: the backbone (path and
        fingerprint) and the tokenizer's fingerprint."""
        return {"path": str(self.model_path), "fingerprint": self.backbone_hash, "tokenizer": self.tok.fingerprint}

    def prompt_group(self, row_group: str) -> str:
        """The prompt group a row of ``row_group`` (its LAMA relation or task) trains."""
        return SHARED if self.groups.names == (SHARED,) else row_group


def resolve_model_path(cfg: RunConfig) -> Path:
    """``model.path``, or the embedded default: the knowledge LM (``backbone/knowledge.py``, built
    once into the user cache), copied into ``<output_dir>/default_backbone`` so a run directory is
    self-contained (a few MB)."""
    if cfg.model.path is not None:
        return Path(cfg.model.path)
    out = Path(cfg.train.output_dir) / "default_backbone"
    if not (out / "config.json").is_file():
        import shutil

        from ptuning_dist.backbone.knowledge import knowledge_dir

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(knowledge_dir() / "model", tmp)
        tmp.rename(out)  # atomic: a half-copied model is never taken for a good one
    return out


def check_model_files(cfg: RunConfig, model_path: Path, hf_cfg) -> None:
    """What config.json says, before any weight is read: the sequence fits the model's positions;
    every weight file is a complete safetensors file (its header and the size it declares)."""
    positions = getattr(hf_cfg, "n_positions", None) or getattr(hf_cfg, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.data.max_seq_len > positions:
        raise ConfigError(f"data.max_seq_len = {cfg.data.max_seq_len} exceeds the {positions} positions of "
                          f"{model_path / 'config.json'}; give --max_seq_len {positions} or less")
    vocab = getattr(hf_cfg, "vocab_size", None)
    if type(vocab) is not int or vocab < 1:
        raise ConfigError(f"model.path: {model_path / 'config.json'} has no valid vocab_size ({vocab!r})")
    from ptuning_dist.backbone.safetensors_io import check_complete

    for f in sorted(model_path.glob("*.safetensors")):
        check_complete(f)


def check_tokenizer(tok: PieceTokenizer, hf_cfg, model_path: Path) -> None:
    """Every id the tokenizer can produce indexes the model's embedding (a larger tokenizer would
    read past it: the fused splice would silently give zero vectors, the reference an IndexError)."""
    if tok.vocab_size > hf_cfg.vocab_size:
        raise ConfigError(f"model.path: the tokenizer in {model_path} has {tok.vocab_size} ids, more than "
                          f"{model_path / 'config.json'}'s vocab_size {hf_cfg.vocab_size}: ids from "
                          f"{hf_cfg.vocab_size} on have no embedding row (another model's tokenizer?)")


def default_data_dir(cfg: RunConfig, model_path: Path) -> Path | None:
    """Task 'default' on a model that carries its own probe (the embedded knowledge LM: the facts it
    was trained on, ``backbone/knowledge.py``) reads that probe; on any other model the bundled
    two-relation set. Other tasks: data.data_dir."""
    from ptuning_dist.backbone.knowledge import PROBE

    probe = model_path / PROBE
    if cfg.data.task == "default" and cfg.data.data_dir is None and (probe / "relations.jsonl").is_file():
        return probe
    return cfg.data.data_dir


def build_run(cfg: RunConfig, device: torch.device | None = None, fill: str | None = None,
              load_backbone: bool = True) -> Run:
    """Everything but the encoder: tokenizer, task, template, candidates, frozen backbone
    (``load_backbone`` False: none, e.g. to re-export a table, which needs only its identity).
    ``fill`` ("zero3" / "fsdp2", ``ParallelPlan.fill``): the HF backbone is built empty, for
    ``parallelize`` to fill each rank's partition from the files."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_path = resolve_model_path(cfg)
    if not (model_path / "config.json").is_file():
        raise ConfigError(f"model.path: {model_path} is not a Hugging Face model directory (no config.json)")
    from ptuning_dist.backbone.megatron_import import hf_config

    check_model_files(cfg, model_path, hf_config(model_path))
    tok = PieceTokenizer.from_dir(model_path)
    check_tokenizer(tok, hf_config(model_path), model_path)
    task = build_task(cfg.data.task, default_data_dir(cfg, model_path), cfg.data.relations, cfg.data.multi_token)
    templates = {g: Template(cfg.prompt.template or task.template_of(g), fields=task.fields_of(g))
                 for g in task.groups()}
    template = next(iter(templates.values()))  # one task: its template, whatever the group
    groups = prompt_groups(cfg.prompt.sharing, task, templates)
    mask_space = template.parts[-1].space_before
    cands = build_candidates(task, tok, cfg.data.allowed_vocab, mask_space)
    from ptuning_dist.backbone.megatron_dist import is_torch_dist, source_fingerprint

    torch_dist = is_torch_dist(model_path)
    backbone_hash = source_fingerprint(model_path) if torch_dist else fingerprint(model_path)
    if not load_backbone:
        return Run(cfg, model_path, backbone_hash, tok, task, template, cands, None, device,
                   hf_config(model_path).hidden_size, groups, templates)
    if torch_dist and cfg.model.backend != "megatron":
        raise ConfigError(f"model.path: {model_path} is a megatron-core torch_dist checkpoint; it loads on "
                          "model.backend = megatron (--backend megatron)")
    if cfg.model.backend == "megatron":
        from ptuning_dist.backbone.families import family
        from ptuning_dist.backbone.megatron import MegatronBackbone

        hf_cfg = hf_config(model_path)
        window = family(hf_cfg.model_type, need="megatron").attention_window(hf_cfg)
        if window is not None and cfg.data.max_seq_len > window:  # the local layer spec has no banded attention
            raise ConfigError(f"data.max_seq_len = {cfg.data.max_seq_len} exceeds {model_path / 'config.json'}'s "
                              f"sliding_window {window}: model.backend = megatron attends causally over the whole "
                              "sequence; use a shorter --max_seq_len or --backend hf")

        # each rank reads only its TP slice of its stage's tensors, in the run's dtype
        backbone = MegatronBackbone.from_pretrained(model_path, DTYPES[cfg.model.dtype]).to(device)
    elif fill is not None:  # partitioned (zero.Init) or on the meta device: filled after sharding
        backbone = HFBackbone.empty(model_path, cfg.model.dtype, zero3=fill == "zero3")
    else:
        backbone = HFBackbone.from_pretrained(model_path, cfg.model.dtype).to(device)
    return Run(cfg, model_path, backbone_hash, tok, task, template, cands, backbone, device, backbone.hidden_size,
               groups, templates)


def prompt_groups(sharing: str, task: Task, templates: dict[str, Template]) -> PromptGroups:
    """One group per task group (LAMA relation, or task) under 'per_group', with its template's
    slots; one under 'shared'."""
    if sharing == "shared":
        return PromptGroups.of([SHARED], next(iter(templates.values())).n_prompt)
    return PromptGroups(tuple(templates), tuple(t.n_prompt for t in templates.values()))


def examples(run: Run, split: str, manual: bool = False) -> list[Example]:
    """Encoded examples of a split: through the P-tuning template, or (``manual``) through each
    group's hand-written template with no prompt slots (the manual baseline)."""
    return encode(run, run.task.rows(split), manual)


def encode(run: Run, rows: list, manual: bool = False) -> list[Example]:
    """``examples`` of any rows (``Task.read``: a file to predict)."""
    if manual:
        templates = {g: Template(run.task.manual_template(g)) for g in {r.group for r in rows}}
        template_for = lambda row: templates[row.group]  # noqa: E731
    else:
        template_for = lambda row: run.templates.get(row.group, run.template)  # noqa: E731
    groups = run.groups

    def prompt_group_of(row):
        name = run.prompt_group(row.group)
        if name not in groups.names:
            raise ConfigError(f"{row.where}: group {row.group!r} has no prompt; the prompt groups are "
                              f"{list(groups.names)}")
        return groups.index(name), groups.rows(name)[0]

    return encode_rows(rows, template_for, run.tok, run.cfg.data.max_seq_len, run.cands, prompt_group_of)


def build_encoders(run: Run, seed: int) -> PromptEncoders:
    """The run's prompt encoders, one per group, each seeded from (seed, its name): identical on
    every rank, and a group's start does not depend on the other groups."""
    return PromptEncoders(run.cfg.prompt.encoder, run.groups, run.hidden_size, run.cfg.prompt.lstm_dropout, seed)


def build_model(run: Run, seed: int) -> tuple[PTuningModel, PromptEncoders | None]:
    """The encoders and the model around the frozen backbone. Under pipeline parallelism only
    the first stage holds the encoders (None elsewhere)."""
    encoder = None
    if run.backbone.is_first_stage:
        torch.manual_seed(seed)  # the global RNG (LSTM dropout) starts from the seed on every rank
        encoder = build_encoders(run, seed)
        encoder.to(run.device)
    model = PTuningModel(run.backbone, encoder, _to(run.cands.tensor(), run.device), run.cfg.model.splice)
    model.frozen.mean_score = run.cfg.data.candidate_score == "mean"
    return model, encoder


def _to(t, device):
    return None if t is None else t.to(device)
