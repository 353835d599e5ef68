"""`config.yaml` for `rankwatch deeplog train|evaluate`: the sections of the standalone tool users run today
(model, training, data) plus evaluation and output. Every field has a default, so no file is needed; the CLI
flags override the file. Unknown keys are an error (a typo must not silently fall back to a default).

    model:      {vocab_size: null, embedding_dim: 128, hidden_size: 256, num_layers: 2, dropout: 0.2}
    training:   {batch_size: 256, learning_rate: 0.001, num_epochs: 50, max_grad_norm: 1.0,
                 use_multi_gpu: true, mixed_precision: true,
                 early_stopping: {enabled: true, patience: 5, min_delta: 0.0001}, ...}
    data:       {data_dir: ..., window: 10, max_seq_length: 512, validation_split: 0.1,
                 lazy_loading: {enabled: true, buffer_size: 10000, shuffle_buffer: true}, ...}
    evaluation: {top_k: [1, 5, 10, 20], top_g: [1, 3, 5, 9, 10, 15, 20], score_g: 9, normal: .., abnormal: ..}
    output_dir: outputs
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DeepLogConfigError(ValueError):
    """config.yaml or a flag has a key or value rankwatch does not understand."""


@dataclass
class ModelConfig:
    vocab_size: int | None = None  # null: the keys found in the data + 2 (padding, unknown)
    embedding_dim: int = 128
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.2


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = 5  # epochs without an improvement of at least min_delta in validation loss
    min_delta: float = 1e-4


@dataclass
class TrainingConfig:
    batch_size: int = 256  # global: split across GPUs under DDP/DataParallel
    learning_rate: float = 1e-3
    num_epochs: int = 50
    max_grad_norm: float = 1.0
    use_multi_gpu: bool = True  # DDP under torchrun, else DataParallel over every visible GPU
    mixed_precision: bool = True  # fp16 autocast + GradScaler on CUDA (ignored on CPU)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # cosine | constant | plateau
    log_every: int = 100  # steps between log lines (loss, running average, lr, GPUs, elapsed, ETA)
    gpu_stats_every: int = 1000  # steps between the per-GPU block (memory, utilisation, temperature, power)
    checkpoint_every: int = 5000  # steps between step_N.pt checkpoints (0: only per epoch)
    keep_step_checkpoints: int = 3  # older step_N.pt are deleted
    max_steps: int = 0  # stop after this many optimizer steps (0: no cap)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads (0: torch's default; 1 is faster for small models on a busy machine)


@dataclass
class LazyLoadingConfig:
    enabled: bool = True  # always streamed; kept for config compatibility
    buffer_size: int = 10000  # windows held for shuffling
    shuffle_buffer: bool = True


@dataclass
class DataConfig:
    data_dir: list[str] = field(default_factory=list)  # files or folders; `preprocessed_dir` is read as an alias
    format: str = "auto"  # auto | sessions | json | logs
    window: int = 10  # h: keys of history per prediction
    max_seq_length: int = 512  # longer sequences are cut into pieces of this many keys (each keeps its history)
    end_of_sequence: bool = True  # complete sequences (sessions) end with an "<eos>" key the model predicts
    validation_split: float = 0.1  # share of pieces held out for validation loss and early stopping
    max_validation_windows: int = 1_000_000  # validation loss per epoch on at most this many windows (0: all)
    lazy_loading: LazyLoadingConfig = field(default_factory=LazyLoadingConfig)
    sequence_field: str = "auto"  # JSON: the field holding a sequence's keys (auto: keys, event_ids, ...)
    job: str | None = None  # raw logs / topic: only this job
    cache_dir: str | None = None  # where the encoded keys go (default: <output_dir>/cache)
    miner_sim_th: float = 0.5  # raw logs: template mining settings (as the stream's logkey_sim_th, ...)
    miner_depth: int = 4


@dataclass
class EvaluationConfig:
    top_k: list[int] = field(default_factory=lambda: [1, 5, 10, 20])  # next-key accuracy
    top_g: list[int] = field(default_factory=lambda: [1, 3, 5, 9, 10, 15, 20])  # detection, labelled data
    score_g: int = 9  # g of the per-sequence anomaly score (share of keys outside the top g)
    min_prob: float = 0.001  # a key the model gives less than this is no candidate even in the top g (0: off)
    normal: list[str] = field(default_factory=list)  # labelled normal sequences (default: validation pieces)
    abnormal: list[str] = field(default_factory=list)  # labelled abnormal sequences
    batch_size: int = 1024


@dataclass
class DeepLogConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output_dir: str = "outputs"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_ALIASES = {("data", "preprocessed_dir"): "data_dir"}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    text = str(typ)
    if value is None:
        if "None" in text:
            return None
        raise DeepLogConfigError(f"{where} must not be null")
    try:
        if text.startswith("list"):
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            inner = int if "int" in text else str
            return [inner(v.strip() if isinstance(v, str) else v) for v in items]
        base = text.replace(" | None", "")
        if base == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and value != int(value)):
                raise ValueError(value)
            return int(value)
        if base == "float":
            return float(value)
        if base == "str":
            return str(value)
    except (TypeError, ValueError) as exc:
        raise DeepLogConfigError(f"{where}: cannot read {value!r} as {text}") from exc
    return value


def _merge(obj: Any, values: dict[str, Any], where: str) -> None:
    if not isinstance(values, dict):
        raise DeepLogConfigError(f"{where or 'config'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = _ALIASES.get((where, key), key)
        f = fields.get(name)
        if f is None:
            raise DeepLogConfigError(f"unknown setting {where + '.' if where else ''}{key} "
                                     f"(known: {', '.join(sorted(fields))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value or {}, f"{where}.{name}" if where else name)
        else:
            setattr(obj, name, _coerce(value, f.type, f"{where}.{name}" if where else name))


def load_deeplog_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> DeepLogConfig:
    """Defaults, then the YAML file, then `overrides` ({"training.num_epochs": 3, ...}; None = not given)."""
    cfg = DeepLogConfig()
    if path:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise DeepLogConfigError(f"cannot read {path}: {exc}") from exc
        _merge(cfg, data, "")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        tree: dict[str, Any] = {leaf: value}
        for p in reversed(parents):
            tree = {p: tree}
        _merge(cfg, tree, "")
    validate(cfg)
    return cfg


def config_from_dict(d: dict[str, Any]) -> DeepLogConfig:
    cfg = DeepLogConfig()
    _merge(cfg, d, "")
    return cfg


def validate(cfg: DeepLogConfig) -> None:
    t, d = cfg.training, cfg.data
    checks = [
        (t.batch_size > 0, "training.batch_size must be > 0"),
        (t.num_epochs > 0, "training.num_epochs must be > 0"),
        (t.learning_rate > 0, "training.learning_rate must be > 0"),
        (t.lr_schedule in ("cosine", "constant", "plateau"), "training.lr_schedule: cosine, constant or plateau"),
        (d.window > 0, "data.window must be > 0"),
        (d.max_seq_length > 0, "data.max_seq_length must be > 0"),
        (0.0 <= d.validation_split < 1.0, "data.validation_split must be in [0, 1)"),
        (d.format in ("auto", "sessions", "json", "logs"), "data.format: auto, sessions, json or logs"),
        (d.lazy_loading.buffer_size > 0, "data.lazy_loading.buffer_size must be > 0"),
        (cfg.model.vocab_size is None or cfg.model.vocab_size >= 3, "model.vocab_size must be >= 3 or null"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout must be in [0, 1)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DeepLogConfigError(msg)
