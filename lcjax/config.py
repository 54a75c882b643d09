"""Typed, frozen run configuration.

Config files (`configs/*.py`) build an `ml_collections.ConfigDict`; `from_config_dict` turns it into the frozen
dataclasses below, checking every key and type, and `validate` checks the cross-field rules (divisibility, mesh
size) before anything is compiled. The model section's dataclass is chosen by `model.name` through the registry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any

from lcjax.data import birdie_objectives, synthetic
from lcjax.data.tokenizers import ByteTokenizer
from lcjax.errors import ConfigError
from lcjax.layers.attention import AttentionConfig
from lcjax.models import registry
from lcjax.models.lm import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    log_every: int = 50
    eval_every: int = 250
    seed: int = 0
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    z_loss_weight: float = 0.0
    compute_dtype: str = "float32"
    profile_start_step: int = -1
    profile_num_steps: int = 5
    peak_flops_per_device: float = 0.0
    grad_accum_steps: int = 1
    sparse_logits: int = 0  # > 0: the train step's logits only at each row's labelled positions (at most this many)
    debug_nan_step: int = -1  # debug: make the gradients of this step non-finite (tests the skip path)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "grad_accum_steps"):
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.learning_rate", self.learning_rate)
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError("train.compute_dtype", f"must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.z_loss_weight < 0:
            raise ConfigError("train", "grad_clip, weight_decay and z_loss_weight must be >= 0")
        if self.sparse_logits < 0:
            raise ConfigError("train.sparse_logits", f"must be >= 0 (0: logits everywhere), got {self.sparse_logits}")


TEXT_SOURCES = ("stdlib", "text", "jsonl", "arrayrecord")
TASK_NAMES = synthetic.TASKS


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # stdlib | text | jsonl | arrayrecord, or a synthetic task (TASK_NAMES)
    path: str = ""  # file, directory or glob for text/jsonl/arrayrecord
    eval_path: str = ""  # optional separate validation files; else a hash split of `path`
    tokenizer: str = "bytes"  # "bytes", or a path to a sentencepiece .model or a HF tokenizer.json
    eval_fraction: float = 0.05
    text_key: str = "text"
    num_threads: int = 1

    def validate(self) -> None:
        if self.source not in TEXT_SOURCES + TASK_NAMES:
            raise ConfigError(
                "data.source", f"unknown source {self.source!r}; expected one of {TEXT_SOURCES + TASK_NAMES}"
            )
        if self.source in TEXT_SOURCES[1:] and not self.path:
            raise ConfigError("data.path", f"is required for data.source={self.source!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError("data.eval_fraction", f"must be in (0, 1), got {self.eval_fraction}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Parameters of the synthetic tasks (`data.source=<task>` trains on one; `eval.tasks` scores several).
    Every task runs at `train.seq_len`; MQAR and selective copying draw tokens from `model.vocab_size`."""

    num_kv_pairs: int = 8  # mqar: D
    num_passes: int = 1  # mqar: times the key-value block is repeated
    power_a: float = 0.01  # mqar: query gap distribution p(g) ~ g^(a-1)
    num_train_examples: int = 100_000  # training set size of a task source (the eval set uses another seed)
    depth: float = 0.5  # S-NIAH: needle depth in [0, 1]
    random_depth: bool = False  # S-NIAH training set: each needle at a depth drawn from [0, 1] (evals keep `depth`)
    num_entries: int = 8  # phonebook: entries in the book
    num_queries: int = 1  # phonebook: numbers asked for
    num_tokens: int = 16  # selective copying: tokens to copy
    short_set: int = 4  # set disjointness: elements of the first (short) set
    long_set: int = 8  # set disjointness: elements of the second (long) set, one of them shared with the first
    # Training only: weight of the next-token loss at every other content position (the haystack, the needle, the
    # question; MQAR's keys and values...), the answer's targets keeping weight 1. 0: the answer alone. Evaluation
    # always scores the answer alone.
    context_loss: float = 0.0
    # 1 over each example's prompt (everything before the answer) in `prefix_mask`, which Birdie's and JRT's layers
    # read bidirectionally (others ignore it)
    prefix_mask: bool = False

    def validate(self) -> None:
        _positive("task.num_train_examples", self.num_train_examples)
        if not 0.0 <= self.context_loss <= 1.0:
            raise ConfigError("task.context_loss", f"={self.context_loss} must be in [0, 1] (0: the answer alone)")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    num_batches: int = 8
    batch_size: int = 16
    tasks: str = ""  # comma-separated synthetic tasks scored at every eval, e.g. "mqar,passkey"
    jrt_prompt: bool = False  # score tasks with JRT-Prompt (the in-context document twice before the question)
    stream_tokens: int = 0  # --mode=eval: also stream this many validation tokens through decode (0: off)
    stream_piece: int = 0  # tokens per decode call of that stream (0: the model's segment_len, else 256)

    @property
    def task_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())

    def validate(self) -> None:
        _positive("eval.num_batches", self.num_batches)
        _positive("eval.batch_size", self.batch_size)
        for name in ("stream_tokens", "stream_piece"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name}", f"must be >= 0 (0: off / default), got {getattr(self, name)}")
        for task in self.task_list:
            if task not in TASK_NAMES:
                raise ConfigError("eval.tasks", f"unknown task {task!r}; expected a comma list of {TASK_NAMES}")


@dataclasses.dataclass(frozen=True)
class ObjectivesConfig:
    """Birdie's objective mixture over a text source (`lcjax.data.birdie_objectives`) and its reward-driven controller
    (`lcjax.train.birdie_controller`). `mixture=""` trains on plain next-token rows."""

    mixture: str = ""  # "birdie" (the paper's 96 arms), "birdie-small" (8), "ul2", or "name[:weight],..."
    length_scale: float = 1.0  # multiplies every arm's length range (the paper's are for 2048-token rows)
    controller: bool = False  # the reward-driven controller updates the mixture (else it stays fixed)
    reward: str = "code"  # code: positive when a loss falls (the Birdie code) | paper: the paper's printed sign
    reward_model: str = "gated_ssm"  # gated_ssm: the paper's (a Gated SSM over the history) | mlp: the code's agent
    reward_model_width: int = 256
    reward_model_layers: int = 4
    reward_model_steps: int = 200  # training steps of the reward model at each evaluation
    reward_model_lr: float = 5e-4
    num_candidates: int = 2048  # random mixtures scored per update
    top_k: int = 8  # the best candidates averaged into the next mixture
    schedule_scale: float = 1.0  # multiplies the paper's evaluation steps (10, 50, 250, 500, 1000, 1500, 2000, +1000)
    eval_batches: int = 1  # held-out batches (of eval.batch_size rows) per arm for its validation loss

    def validate(self) -> None:
        if self.mixture:
            birdie_objectives.parse_mixture(self.mixture)
        elif self.controller:
            raise ConfigError("objectives.controller", "needs a mixture to control (objectives.mixture is empty)")
        _positive("objectives.length_scale", self.length_scale)
        _positive("objectives.schedule_scale", self.schedule_scale)
        for name in ("reward_model_width", "reward_model_layers", "reward_model_steps", "num_candidates", "top_k"):
            _positive(f"objectives.{name}", getattr(self, name))
        _positive("objectives.eval_batches", self.eval_batches)
        _positive("objectives.reward_model_lr", self.reward_model_lr)
        if self.top_k > self.num_candidates:
            raise ConfigError("objectives.top_k", f"={self.top_k} exceeds num_candidates={self.num_candidates}")
        for name, allowed in (("reward", ("code", "paper")), ("reward_model", ("gated_ssm", "mlp"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"objectives.{name}", f"={getattr(self, name)!r}; expected one of {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def shape(self, device_count: int) -> dict[str, int]:
        """Axis sizes with the one `-1` filled from `device_count` (validated first)."""
        sizes = dataclasses.asdict(self)
        fixed = math.prod(v for v in sizes.values() if v != -1)
        return {k: (device_count // fixed if v == -1 else v) for k, v in sizes.items()}

    def validate(self, device_count: int) -> None:
        sizes = dataclasses.asdict(self)
        for k, v in sizes.items():
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{k}", f"must be a positive size or -1 (fill), got {v}")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError("mesh", "at most one axis may be -1 (fill)")
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if fixed > device_count or device_count % fixed:
            desc = ",".join(f"{k}={v}" for k, v in sizes.items())
            raise ConfigError("mesh", f"{desc} needs {fixed} devices (or a divisor of the count), have {device_count}")
        if -1 not in sizes.values() and fixed != device_count:
            raise ConfigError("mesh", f"uses {fixed} of {device_count} devices; set one axis to -1 to fill")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    max_to_keep: int = 3
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)

    def validate(self) -> None:
        _positive("checkpoint.every", self.every)
        _positive("checkpoint.max_to_keep", self.max_to_keep)
        if self.keep_every < 0:
            raise ConfigError("checkpoint.keep_every", f"must be >= 0, got {self.keep_every}")


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 0.95
    seed: int = 0
    # "": continue the prompt causally. An objective family (birdie_objectives.PARADIGMS, e.g. "prefix_lm"): lay the
    # prompt out as that objective's training sample, [paradigm] prompt [start], the head read bidirectionally by a
    # model with a bidirectional prefix (Birdie's `prefill`), then generate causally.
    paradigm: str = ""

    def validate(self) -> None:
        if self.paradigm and self.paradigm not in birdie_objectives.PARADIGMS:
            raise ConfigError(
                "generate.paradigm",
                f"must be '' or one of {sorted(birdie_objectives.PARADIGMS)}, got {self.paradigm!r}",
            )
        _positive("generate.max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError("generate.temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("generate.top_p", f"must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class Config:
    model: Any  # the `ModelConfig` subclass of `model.name` (lcjax.models.registry)
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    task: TaskConfig = TaskConfig()
    objectives: ObjectivesConfig = ObjectivesConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    generate: GenerateConfig = GenerateConfig()

    def validate(self, device_count: int) -> Config:
        """Checks every cross-field rule; raises ConfigError naming the field. Returns self for chaining."""
        for section in (self.train, self.data, self.eval, self.task, self.objectives, self.checkpoint, self.generate):
            section.validate()
        self.mesh.validate(device_count)
        mesh = self.mesh.shape(device_count)
        batch_shards = mesh["data"] * mesh["fsdp"]
        if self.train.batch_size % batch_shards:
            raise ConfigError(
                "train.batch_size",
                f"={self.train.batch_size} must be divisible by mesh.data*mesh.fsdp={batch_shards}",
            )
        micro_shards = batch_shards * self.train.grad_accum_steps
        if self.train.batch_size % micro_shards:
            raise ConfigError(
                "train.grad_accum_steps",
                f"={self.train.grad_accum_steps}: train.batch_size={self.train.batch_size} must be divisible by "
                f"grad_accum_steps*mesh.data*mesh.fsdp={micro_shards}",
            )
        if self.eval.batch_size % batch_shards:
            raise ConfigError(
                "eval.batch_size", f"={self.eval.batch_size} must be divisible by mesh.data*mesh.fsdp={batch_shards}"
            )
        if self.train.seq_len % mesh["sequence"]:
            raise ConfigError(
                "train.seq_len", f"={self.train.seq_len} must be divisible by mesh.sequence={mesh['sequence']}"
            )
        longest = self.train.seq_len * (2 if self.eval.jrt_prompt else 1)  # JRT-Prompt repeats the context
        self.model.validate(mesh=mesh, seq_len=self.train.seq_len, max_len=longest)
        self._validate_tasks()
        self._validate_objectives()
        return self

    def _validate_objectives(self) -> None:
        """A mixture needs a text source, and every arm's shortest sample must fit a row (checked with the byte
        tokenizer's markers here; another tokenizer's when it loads)."""
        if not self.objectives.mixture:
            return
        if self.data.source in TASK_NAMES:
            raise ConfigError(
                "objectives.mixture",
                f"builds samples from a text source, not the task data.source={self.data.source!r}",
            )
        if self.data.tokenizer == "bytes":
            arms, _ = birdie_objectives.parse_mixture(self.objectives.mixture)
            markers = birdie_objectives.Markers.encode(ByteTokenizer())
            birdie_objectives.check_arms_fit(arms, markers, self.train.seq_len, self.objectives.length_scale, None)

    def _validate_tasks(self) -> None:
        """Builds each configured task once so a bad task parameter fails here, naming its flag. Text tasks
        with a tokenizer file are checked when the tokenizer loads (still before anything is written)."""
        if self.eval.stream_tokens and self.data.source in TASK_NAMES:
            raise ConfigError(
                "eval.stream_tokens", f"streams a text source's validation split; data.source={self.data.source!r}"
            )
        if self.task.random_depth and self.data.source not in synthetic.NIAH_TASKS:
            raise ConfigError(
                "task.random_depth",
                f"applies to training on a needle task {synthetic.NIAH_TASKS}, not data.source={self.data.source!r}",
            )
        tasks = set(self.eval.task_list) | ({self.data.source} & set(TASK_NAMES))
        for name in sorted(tasks):
            text_task = name in synthetic.TEXT_TASKS
            if text_task and self.data.tokenizer != "bytes":
                continue
            synthetic.make_task(
                name,
                self.task,
                tokenizer=ByteTokenizer(),
                vocab_size=self.model.vocab_size,
                seq_len=self.train.seq_len,
                num_examples=1,
                seed=0,
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _positive(field: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(field, f"must be > 0, got {value}")


def _coerce(field: str, value: Any, annotation: Any) -> Any:
    """Checks `value` against a field's type (int, float, str, bool; float accepts int)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif annotation is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(field, f"expected {getattr(annotation, '__name__', annotation)}, got {value!r}")
    return value


def build_section(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Builds dataclass `cls` from a plain dict, refusing unknown keys and wrong types; a field whose type is a
    dataclass (a model's `attention`) is a nested section."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown key; expected one of {sorted(names)}")
    kwargs = {}
    for k, v in values.items():
        if isinstance(hints[k], type) and issubclass(hints[k], ModelConfig):
            kwargs[k] = _model_section(v, f"{prefix}.{k}")
        elif dataclasses.is_dataclass(hints[k]):
            if not isinstance(v, dict):
                raise ConfigError(f"{prefix}.{k}", f"is a section; expected a dict, got {v!r}")
            kwargs[k] = build_section(hints[k], v, f"{prefix}.{k}")
        else:
            kwargs[k] = _coerce(f"{prefix}.{k}", v, hints[k])
    return cls(**kwargs)


def _model_section(values: Any, prefix: str) -> ModelConfig:
    """A model section (`model`, or a wrapper's `model.backbone`): its dataclass is the registry's for its `name`."""
    if not isinstance(values, dict):
        raise ConfigError(prefix, f"is a section; expected a dict, got {values!r}")
    values = dict(values)
    name = values.get("name")
    if name not in registry.names():
        raise ConfigError(f"{prefix}.name", f"unknown model {name!r}; expected one of {registry.names()}")
    for old_key, new_key in _RENAMED.get(name, {}).items():
        if old_key in values:
            values.setdefault(new_key, values.pop(old_key))
    return build_section(registry.config_class(name), values, prefix)


SECTIONS = {
    "train": TrainConfig,
    "data": DataConfig,
    "eval": EvalConfig,
    "task": TaskConfig,
    "objectives": ObjectivesConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "generate": GenerateConfig,
}


def _moved_attention(values: dict[str, Any], model_values: dict[str, Any]) -> dict[str, Any]:
    """A config written before attention settings moved into the model section (a `config.json` or checkpoint of
    2026-12-04 or earlier) had a top-level `attention` section: it moves into `model.attention` of a model that
    attends; for one that does not, it must be the defaults (it was ignored then)."""
    legacy = values.get("attention")
    if legacy is None:
        return model_values
    cls = registry.config_class(model_values["name"])
    if "attention" in {f.name for f in dataclasses.fields(cls)}:
        return {"attention": legacy, **model_values}
    default = dataclasses.asdict(AttentionConfig())
    changed = sorted(k for k, v in legacy.items() if k not in default or default[k] != v)
    if changed:
        raise ConfigError(
            f"attention.{changed[0]}", f"model {model_values['name']} does not attend; it has no attention settings"
        )
    return model_values


# Model fields renamed to the `<mixer>_impl` pattern on 2026-12-04: a config written before (a `config.json`, a
# checkpoint's metadata, an exported folder) still reads.
_RENAMED = {"mamba2": {"scan_impl": "ssd_impl"}, "xlstm": {"cell_impl": "mlstm_impl"}}


def from_dict(values: dict[str, Any]) -> Config:
    """Builds a Config from nested plain dicts (a ConfigDict's `to_dict()`, or a saved config.json)."""
    unknown = sorted(set(values) - set(SECTIONS) - {"model", "attention"})
    if unknown:
        raise ConfigError(unknown[0], f"unknown section; expected model or one of {sorted(SECTIONS)}")
    model_values = dict(values.get("model", {}))
    if model_values.get("name") not in registry.names():
        name = model_values.get("name")
        raise ConfigError("model.name", f"unknown model {name!r}; expected one of {registry.names()}")
    model_values = _moved_attention(values, model_values)
    sections = {k: build_section(cls, dict(values.get(k, {})), k) for k, cls in SECTIONS.items()}
    model = _model_section(model_values, "model")
    return Config(model=model, **sections)


def from_config_dict(config_dict: Any) -> Config:
    return from_dict(config_dict.to_dict())
