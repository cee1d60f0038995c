"""Training configuration: the upstream argument names and defaults (docs/upstream-compat.md#training-arguments), plus run options.

Values come from three layers, later ones winning: dataclass defaults, the `train:` section of the mixture
YAML given with `--config`, then `--name value` flags. Booleans accept `--flag True/False` (as upstream's
HF parser) and a bare `--flag`. Every user mistake raises `ConfigError` with one clear message; the job
prints it and exits non-zero.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml

VALID_LAYER_MODULES = ("Qwen2DecoderLayer", "Qwen2MoEDecoderLayer", "Qwen2MoTDecoderLayer")
VALID_SCHEDULERS = ("constant", "cosine")
VALID_SHARDING = ("FULL_SHARD", "HYBRID_SHARD", "NO_SHARD")
MODEL_PRESETS = ("tiny", "7b")


class ConfigError(ValueError):
    """A user mistake in the configuration; the message says what to change. `problems` holds one line per
    mistake when `validate` found several (jobs/train.py prints each as its own `error:` line)."""

    def __init__(self, message: str, problems: Optional[list[str]] = None) -> None:
        self.problems = list(problems) if problems else [message]
        super().__init__(message)


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArguments:
    model: Optional[str] = _f(None, "architecture preset (tiny | 7b), random init unless weights are given")
    model_path: Optional[str] = _f(None, "checkpoint directory: architecture (llm/vit configs), tokenizer and weights")
    llm_path: Optional[str] = _f(None, "upstream: Qwen2 weights when not fine-tuning from HF (not supported: use model_path)")
    vit_path: Optional[str] = _f(None, "upstream: SigLIP weights (not supported: use model_path)")
    vae_path: Optional[str] = _f(None, "FLUX VAE weights (default: model_path/ae.safetensors)")
    llm_qk_norm: bool = _f(True, "per-head RMSNorm on q and k")
    tie_word_embeddings: bool = _f(False, "tie lm_head to embed_tokens")
    layer_module: str = _f("Qwen2MoTDecoderLayer", "decoder layer class (UMV's default name is invalid; not repeated)")
    max_latent_size: Optional[int] = _f(None, "latent grid side (default: from the preset / checkpoint; 64 for released)")
    latent_patch_size: Optional[int] = _f(None, "latent patch size p (default: from the preset / checkpoint)")
    vit_patch_size: Optional[int] = _f(None, "ViT patch size (default: from the preset / checkpoint)")
    vit_max_num_patch_per_side: Optional[int] = _f(None, "ViT patches per side (default: from preset / checkpoint)")
    connector_act: str = _f("gelu_pytorch_tanh", "connector activation")
    interpolate_pos: bool = _f(False, "interpolate instead of extrapolate position ids")
    vit_select_layer: int = _f(-2, "ViT keeps n_layers + 1 + vit_select_layer layers")
    vit_rope: bool = _f(False, "RoPE in the ViT")
    text_cond_dropout_prob: float = _f(0.1, "CFG dropout of text elements with enable_cfg")
    vae_cond_dropout_prob: float = _f(0.3, "CFG dropout of conditioning VAE images")
    vit_cond_dropout_prob: float = _f(0.3, "CFG dropout of ViT images (applied even when visual_gen is off: "
                                           "upstream silently used 0.4 then)")


@dataclass
class DataArguments:
    dataset_config_file: Optional[str] = _f(None, "mixture YAML (default: the --config file)")
    catalog: Optional[str] = _f(None, "catalog YAML (wins over the mixture's catalog: key; default: that key, else "
                                      "the one of catalog/*.yaml that lists every dataset name)")
    shards: Optional[str] = _f(None, "shard folder or s3://bucket/prefix (wins over the mixture's shards: key; "
                                     "default: that key, else the catalog's output_dir)")
    prefetch_factor: int = _f(2, "packed batches loaded ahead of compute")
    dataloader_workers: int = _f(1, "background loader processes per Ray worker (0 = a thread); "
                                     "upstream's DataArguments.num_workers")
    dataloader_threads: int = _f(0, "pack-building threads inside each loader (MixtureStream.batches; same "
                                    "batches, built ahead; 2 per spare pair of cores)")
    max_num_tokens_per_sample: int = _f(16384, "longer samples are skipped")
    max_num_tokens: int = _f(36864, "hard cap for one packed batch")
    expected_num_tokens: int = _f(32768, "a pack is yielded once it holds this many tokens")
    prefer_buffer_before: int = _f(16384, "take from the overflow buffer while the pack is shorter than this")
    max_buffer_size: int = _f(50, "overflow buffer capacity")
    data_seed: int = _f(42, "seed of the data stream")


@dataclass
class TrainingArguments:
    visual_gen: bool = _f(True, "train image generation (needs a generation dataset in the mixture)")
    visual_und: bool = _f(True, "train image understanding (ViT path)")
    results_dir: Optional[str] = _f(None, "run directory (default: storage_path/name)")
    checkpoint_dir: Optional[str] = _f(None, "checkpoint directory (default: results_dir/checkpoints)")
    enable_tensorboard: bool = _f(True, "write TensorBoard events to results_dir/tensorboard")
    max_checkpoints: int = _f(5, "keep only the newest N checkpoints")
    global_seed: int = _f(4396, "rank r is seeded with global_seed * world_size + r")
    auto_resume: bool = _f(True, "continue from the newest complete checkpoint in checkpoint_dir")
    resume_from: Optional[str] = _f(None, "checkpoint directory to resume or fine-tune from")
    resume_model_only: bool = _f(False, "load only weights from resume_from (fresh optimizer, step 0, stream)")
    resume_model_optimizer: bool = _f(True, "also load optimizer and scheduler when resuming")
    finetune_from_ema: bool = _f(False, "initialise from ema.safetensors (a fine-tune: train state not loaded)")
    finetune_from_hf: bool = _f(False, "model_path is an HF-style checkpoint to fine-tune (weights are loaded "
                                        "from it; upstream left the model at random init)")
    from_scratch: bool = _f(False, "explicitly train from random init (required when no weights are given)")
    log_every: int = _f(10, "metrics every N steps")
    save_every: int = _f(2000, "checkpoint every N steps (and always at the end)")
    total_steps: int = _f(500_000, "optimizer steps")
    stop_at_step: Optional[int] = _f(None, "save and stop after this step (preemption drill; schedule unchanged)")
    warmup_steps: int = _f(2000, "linear LR warm-up steps (must not exceed total_steps)")
    lr_scheduler: str = _f("constant", "constant | cosine")
    lr: float = _f(1e-4, "peak learning rate")
    min_lr: float = _f(1e-7, "final LR of the cosine schedule")
    llm_lr: Optional[float] = _f(None, "LR of language_model (default: lr)")
    vit_lr: Optional[float] = _f(None, "LR of vit_model (default: lr)")
    vae_lr: Optional[float] = _f(None, "LR of vae_model (default: lr)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-15, "AdamW eps")
    ema: float = _f(0.9999, "EMA decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    timestep_shift: float = _f(1.0, "training noise-schedule shift")
    mse_weight: float = _f(1.0, "weight of the flow-matching MSE")
    ce_weight: float = _f(1.0, "weight of the text CE")
    ce_loss_reweighting: bool = _f(False, "weight CE tokens by ce_loss_weights (len2weight)")
    gradient_accumulation_steps: int = _f(1, "packed batches per optimizer step")
    peak_device_tflops: float = _f(0.0, "peak bf16 TFLOPs per device for MFU (0 = from the GPU name)")
    num_replicate: int = _f(1, "HYBRID_SHARD replicas")
    num_shard: Optional[int] = _f(None, "HYBRID_SHARD shard group size (default: world_size / num_replicate)")
    sharding_strategy: str = _f("HYBRID_SHARD", "FULL_SHARD | HYBRID_SHARD | NO_SHARD (GPU only)")
    backward_prefetch: str = _f("BACKWARD_PRE", "FSDP1 option, accepted for script compatibility (FSDP2 prefetches "
                                                "on its own)")
    cpu_offload: bool = _f(False, "FSDP CPU offload of parameters")
    activation_checkpointing: bool = _f(True, "checkpoint decoder/ViT layers on GPU")
    freeze_llm: bool = _f(False, "freeze language_model")
    freeze_vit: bool = _f(False, "freeze vit_model")
    freeze_vae: bool = _f(True, "freeze the VAE (encode without grad)")
    freeze_und: bool = _f(False, "detach und-token activations (no requires_grad change)")
    copy_init_moe: bool = _f(True, "copy und weights into *_moe_gen twins at init")
    finetuning_type: str = _f("full", "full | freeze (language model frozen, as --freeze_llm) | lora (adapters "
                                      "through peft on a frozen base; needs --model_path, docs/training.md)")
    lora_rank: int = _f(8, "LoRA rank r")
    lora_alpha: Optional[float] = _f(None, "LoRA alpha (default 2 x lora_rank)")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_target: str = _f("all", "all (every Linear of the decoder layers) or a comma list: q_proj,v_proj,...")
    lora_experts: str = _f("both", "und | gen | both: which twin of each MoT layer gets adapters")
    lora_vit: bool = _f(False, "LoRA adapters on the ViT encoder layers too (else the ViT stays frozen)")
    lora_connectors: bool = _f(False, "LoRA adapters on connector, vae2llm, llm2vae (else they stay frozen)")
    use_flex: bool = _f(False, "flex attention packing (pad to max_num_tokens)")
    deterministic: bool = _f(False, "deterministic torch algorithms (exact-resume drills)")
    wandb_project: Optional[str] = _f(None, "accepted for upstream scripts; W&B is not used (TensorBoard is)")
    wandb_name: Optional[str] = _f(None, "accepted for upstream scripts; W&B is not used")
    wandb_runid: Optional[str] = _f(None, "accepted for upstream scripts; W&B is not used")
    wandb_resume: Optional[str] = _f(None, "accepted for upstream scripts; W&B is not used")
    wandb_offline: bool = _f(False, "accepted for upstream scripts; W&B is not used")


@dataclass
class RunArguments:
    config: Optional[str] = _f(None, "mixture YAML with an optional train: section")
    num_workers: int = _f(1, "Ray Train workers (data-parallel ranks)")
    use_gpu: bool = _f(False, "one GPU per worker (NCCL + FSDP); CPU: gloo + DDP")
    parallelism: str = _f("auto", "auto (FSDP2 on GPU, DDP on CPU) | ddp | fsdp (FSDP2 also runs on CPU/gloo)")
    cpus_per_worker: Optional[float] = _f(None, "CPUs reserved per worker (default: 0.5 on CPU, 4 on GPU)")
    storage_path: str = _f("runs", "Ray Train storage path; the run directory is storage_path/name. An s3:// URI "
                                   "keeps the run directory (logs, metrics) local ($MEDLOOM_LOCAL_RUNS or ./runs); "
                                   "checkpoints go to storage_path/name/checkpoints, each rank uploading its own "
                                   "files, so nodes need no shared disk (docs/cluster.md)")
    placement_strategy: str = _f("PACK", "Ray placement of the workers: PACK (fill a node first), SPREAD, or "
                                         "STRICT_SPREAD (one worker per node)")
    name: Optional[str] = _f(None, "run name (default: the config file's stem)")
    address: Optional[str] = _f(None, "Ray cluster address (auto = join the running cluster; default: "
                                      "RAY_ADDRESS, else an embedded local Ray)")
    num_cpus: Optional[int] = _f(None, "logical CPUs of the embedded local Ray (default: max(4, cores))")
    max_failures: int = _f(2, "worker-group restarts Ray Train may do (from the last checkpoint)")
    torch_threads: Optional[int] = _f(None, "torch intra-op threads per worker (default: 1 on CPU)")
    inject_failure_at_step: Optional[int] = _f(None, "testing: rank inject_failure_rank raises once after this step")
    inject_failure_rank: int = _f(1, "testing: which rank fails")
    check_memory: bool = _f(True, "GPU runs: refuse to start when the memory planner's estimate per GPU exceeds "
                                  "the visible GPU's memory (docs/training.md#memory-planner)")


GROUPS = (("model", ModelArguments), ("data", DataArguments), ("train", TrainingArguments), ("run", RunArguments))


@dataclass
class TrainConfig:
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    train: TrainingArguments = field(default_factory=TrainingArguments)
    run: RunArguments = field(default_factory=RunArguments)
    explicit: list[str] = field(default_factory=list)   # names the user set (config or flags)

    # ---- plumbing ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**{name: klass(**d.get(name, {})) for name, klass in GROUPS}, explicit=list(d.get("explicit", [])))

    def flat(self) -> dict[str, Any]:
        """All arguments under their upstream names (what training_args.json stores)."""
        out: dict[str, Any] = {}
        for name, _ in GROUPS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out

    def get(self, name: str) -> Any:
        return getattr(getattr(self, _OWNER[name]), name)

    def set(self, name: str, value: Any) -> None:
        setattr(getattr(self, _OWNER[name]), name, value)

    @property
    def mixture_path(self) -> Optional[str]:
        return self.data.dataset_config_file or self.run.config

    @property
    def run_name(self) -> str:
        if self.run.name:
            return self.run.name
        return Path(self.mixture_path).stem if self.mixture_path else "run"

    @property
    def results_dir(self) -> Path:
        if self.train.results_dir:
            return Path(self.train.results_dir).resolve()
        return (local_runs_root(self.run.storage_path) / self.run_name).resolve()

    @property
    def checkpoint_dir(self) -> Path:
        if self.train.checkpoint_dir:
            return Path(self.train.checkpoint_dir).resolve()
        return self.results_dir / "checkpoints"


_OWNER: dict[str, str] = {}
_TYPES: dict[str, Any] = {}
for _group, _klass in GROUPS:
    _hints = get_type_hints(_klass)
    for _fld in fields(_klass):
        _OWNER[_fld.name] = _group
        _TYPES[_fld.name] = _hints[_fld.name]
# upstream's DataArguments.num_workers means DataLoader workers; ours means Ray Train workers (see docs)
ARG_NAMES = tuple(_OWNER)

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _base_type(tp: Any) -> Any:
    args = getattr(tp, "__args__", None)
    if args and type(None) in args:  # Optional[X]
        return next(a for a in args if a is not type(None))
    return tp


def _is_optional(tp: Any) -> bool:
    return type(None) in (getattr(tp, "__args__", None) or ())


def coerce(name: str, value: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a ConfigError naming `where`."""
    tp = _TYPES[name]
    base = _base_type(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and _is_optional(tp)):
        if _is_optional(tp):
            return None
        raise ConfigError(f"{where}: {name} cannot be empty (expected {base.__name__})")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = "True or False" if base is bool else f"a{'n' if base is int else ''} {base.__name__}"
        raise ConfigError(f"{where}: {name} must be {kind}, got {value!r}") from None


_HINTS = {"learning_rate": "lr", "max_steps": "total_steps", "num_train_steps": "total_steps",
          "lr_warmup_steps": "warmup_steps", "warmup": "warmup_steps", "ema_decay": "ema", "seed": "global_seed",
          "grad_accum": "gradient_accumulation_steps", "batch_tokens": "expected_num_tokens"}


def _unknown(name: str, where: str) -> ConfigError:
    close = [_HINTS[name]] if name in _HINTS else difflib.get_close_matches(name, ARG_NAMES, n=3, cutoff=0.6)
    if not close:
        close = [a for a in ARG_NAMES if name in a or a in name][:3]
    hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else " See --help for the list."
    return ConfigError(f"{where}: unknown argument {name!r}.{hint}")


def read_train_section(path: str | Path) -> dict[str, tuple[Any, str]]:
    """`train:` of a mixture YAML as {name: (value, 'file:line')}; other top-level keys are the mixture."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict) or "train" not in data:
        return {}
    section = data["train"]
    if section is None:
        return {}
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.value == "train" and hasattr(value_node, "value") and isinstance(value_node.value, list):
            for k, _ in value_node.value:
                lines[k.value] = k.start_mark.line + 1
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: the train: section must be a mapping of argument: value")
    return {str(k): (v, f"{path}:{lines.get(str(k), '?')}") for k, v in section.items()}


def parse_cli(argv: list[str]) -> dict[str, tuple[Any, str]]:
    """`--name value`, `--name=value`, bare boolean `--flag`; returns {name: (raw value, 'flag --name')}."""
    out: dict[str, tuple[Any, str]] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: arguments are --name value")
        name, eq, inline = tok[2:].partition("=")
        name = name.replace("-", "_")
        where = f"flag --{name}"
        if name not in _OWNER:
            raise _unknown(name, where)
        if eq:
            value: Any = inline
            i += 1
        elif _base_type(_TYPES[name]) is bool:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and nxt.lower() in _TRUE | _FALSE:
                value, i = nxt, i + 2
            else:
                value, i = True, i + 1
        else:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
                raise ConfigError(f"{where}: needs a value")
            value, i = argv[i + 1], i + 2
        out[name] = (value, where)
    return out


def load_config(argv: list[str]) -> TrainConfig:
    """Defaults < `train:` section of --config < flags. Does not validate (see `validate`)."""
    cli = parse_cli(argv)
    cfg = TrainConfig()
    explicit: list[str] = []
    config_path = cli.get("config", (None, ""))[0]
    layers = []
    if config_path:
        layers.append(read_train_section(config_path))
    layers.append(cli)
    for layer in layers:
        for name, (raw, where) in layer.items():
            if name not in _OWNER:
                raise _unknown(name, where)
            cfg.set(name, coerce(name, raw, where))
            if name not in explicit:
                explicit.append(name)
    if "model_path" in cli and "model" not in cli and "model" in (layers[0] if config_path else {}):
        # a checkpoint on the command line replaces the config's architecture preset (and its from_scratch)
        cfg.model.model = None
        if "from_scratch" not in cli:
            cfg.train.from_scratch = False
    cfg.explicit = explicit
    return cfg


def help_text() -> str:
    lines = ["usage: python jobs/train.py --config CONFIG.yaml [--name value ...]", "",
             "Arguments keep the upstream BAGEL/UniMedVL names; booleans take True/False or a bare --flag.",
             "The config's train: section takes the same names; flags override it.", ""]
    for group, klass in GROUPS:
        lines.append(f"{group} arguments:")
        for fld in fields(klass):
            lines.append(f"  --{fld.name:<30} {fld.metadata.get('help', '')} (default: {fld.default})")
        lines.append("")
    return "\n".join(lines)


# ---- validation ----------------------------------------------------------------------------------

def _kind_names(fact: str) -> str:
    """Task kinds with a TaskKind fact set, for error messages (the list follows task_kinds.py)."""
    from datasets_catalog.task_kinds import TASK_KINDS

    return ", ".join(k.name for k in TASK_KINDS if getattr(k, fact))


def validate(cfg: TrainConfig, generation_groups: Optional[list[str]] = None,
             mandatory: Optional[dict[str, bool]] = None) -> None:
    """Refuse unsafe or contradictory settings, all of them at once (one ConfigError whose `problems` lists
    each). `generation_groups`: mixture groups with noised VAE targets; `mandatory`: {"vit": bool, "gen":
    bool} coverage by mandatory groups (None = mixture not inspected)."""
    problems = _problems(cfg, generation_groups, mandatory)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "\n".join(problems), problems)


def _problems(cfg: TrainConfig, generation_groups: Optional[list[str]],
              mandatory: Optional[dict[str, bool]]) -> list[str]:
    t, m, d, r = cfg.train, cfg.model, cfg.data, cfg.run
    problems: list[str] = []
    bad = problems.append
    if r.placement_strategy not in ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"):
        bad(f"placement_strategy must be PACK, SPREAD, STRICT_SPREAD or STRICT_PACK, got "
                          f"{r.placement_strategy!r}")
    if not cfg.mixture_path:
        bad("no dataset mixture: pass --config CONFIG.yaml (or --dataset_config_file)")
    if t.total_steps < 1:
        bad(f"total_steps must be >= 1, got {t.total_steps}")
    if t.warmup_steps < 0 or t.warmup_steps > t.total_steps:
        bad(
            f"warmup_steps ({t.warmup_steps}) is longer than training (total_steps {t.total_steps}): the LR would "
            f"only reach {t.lr * t.total_steps / max(t.warmup_steps, 1):.3g} of lr={t.lr} (upstream's train_example.sh "
            f"pitfall). "
            f"Set --warmup_steps to at most {t.total_steps}, e.g. {max(1, t.total_steps // 10)}")
    for name in ("log_every", "save_every", "max_checkpoints", "gradient_accumulation_steps", "num_workers",
                 "prefetch_factor", "num_replicate"):
        if cfg.get(name) < 1:
            bad(f"{name} must be >= 1, got {cfg.get(name)}")
    if d.dataloader_workers < 0:
        bad(f"dataloader_workers must be >= 0, got {d.dataloader_workers}")
    if d.dataloader_threads < 0:
        bad(f"dataloader_threads must be >= 0, got {d.dataloader_threads}")
    if t.stop_at_step is not None and not 1 <= t.stop_at_step <= t.total_steps:
        bad(f"stop_at_step must be in [1, total_steps={t.total_steps}], got {t.stop_at_step}")
    if not 0.0 <= t.ema <= 1.0:
        bad(f"ema (decay) must be in [0, 1], got {t.ema}")
    if t.lr_scheduler not in VALID_SCHEDULERS:
        bad(f"lr_scheduler must be one of {', '.join(VALID_SCHEDULERS)}, got {t.lr_scheduler!r}")
    if t.lr_scheduler == "cosine" and t.min_lr > t.lr:
        bad(f"min_lr ({t.min_lr}) must not exceed lr ({t.lr})")
    if m.layer_module not in VALID_LAYER_MODULES:
        bad(f"layer_module must be one of {', '.join(VALID_LAYER_MODULES)}, got {m.layer_module!r} "
                          f"(UniMedVL's default 'Qwen2MoTDecoderLayer_with_hidden_outputs' is not a valid key)")
    if r.parallelism not in ("auto", "ddp", "fsdp"):
        bad(f"parallelism must be auto, ddp or fsdp, got {r.parallelism!r}")
    if t.sharding_strategy not in VALID_SHARDING:
        bad(f"sharding_strategy must be one of {', '.join(VALID_SHARDING)}, got {t.sharding_strategy!r}")
    if m.model is not None and m.model not in MODEL_PRESETS:
        bad(f"--model must be one of {', '.join(MODEL_PRESETS)}, got {m.model!r}")
    if m.model is None and m.model_path is None:
        bad("no model: pass --model tiny|7b (architecture preset) or --model_path CHECKPOINT_DIR")
    if m.model is not None and m.model_path is not None:
        bad("pass either --model (a preset) or --model_path (a checkpoint), not both")
    if m.llm_path or m.vit_path:
        bad("llm_path / vit_path (loading raw Qwen2 / SigLIP weights) are not supported: convert them "
                          "into a checkpoint directory and pass --model_path")
    if t.finetuning_type not in ("full", "freeze", "lora"):
        bad(f"finetuning_type must be full, freeze or lora, got {t.finetuning_type!r}")
    if t.finetuning_type == "lora":
        try:
            _validate_lora(cfg)
        except ConfigError as exc:
            bad(str(exc))
    if not t.visual_und and not t.visual_gen:
        bad("visual_und and visual_gen are both False: nothing to train on images; enable one")
    if t.finetune_from_hf and not m.model_path:
        bad("finetune_from_hf needs --model_path (the HF checkpoint directory to fine-tune)")
    has_weights = bool(m.model_path) or bool(t.resume_from)
    if not has_weights and not t.from_scratch:
        bad(
            "no weights to fine-tune from: pass --model_path CHECKPOINT_DIR or --resume_from CHECKPOINT_DIR, "
            "or --from_scratch True to train from random init on purpose (upstream silently did the latter)")
    if t.from_scratch and has_weights:
        bad("--from_scratch contradicts --model_path/--resume_from (weights would be loaded)")
    if t.visual_gen and generation_groups is not None and not generation_groups:
        bad(
            f"visual_gen is True but the mixture has no generation dataset ({_kind_names('generation')}): "
            "every batch would lack MSE targets and ranks would skip collectives. Add one, "
            "or pass --visual_gen False")
    fsdp = r.parallelism == "fsdp" or (r.parallelism == "auto" and r.use_gpu)
    if fsdp and r.num_workers > 1 and mandatory is not None:
        need = [k for k, on in (("vit", t.visual_und), ("gen", t.visual_gen)) if on and not mandatory.get(k)]
        if need:
            what = {"vit": "an image-understanding group whose samples always carry ViT tokens "
                           f"({_kind_names('always_vit')})",
                    "gen": f"a generation group ({_kind_names('generation')})"}
            bad(
                f"FSDP over {r.num_workers} ranks needs every rank to run the same units in every step, so each "
                f"pack must contain {' and '.join(what[k] for k in need)}: mark such a group `is_mandatory: true` "
                f"in the mixture (UniMedVL's TRAINING.md rule), or use --parallelism ddp")
    if r.use_gpu and t.sharding_strategy == "HYBRID_SHARD" and t.num_replicate >= 1:
        shard = t.num_shard or max(1, r.num_workers // t.num_replicate)
        if t.num_replicate * shard != r.num_workers:
            bad(f"HYBRID_SHARD needs num_replicate ({t.num_replicate}) x num_shard ({shard}) == "
                              f"num_workers ({r.num_workers})")
    return problems


PATH_ARGS = ("config", "dataset_config_file", "catalog", "shards", "model_path", "resume_from", "vae_path",
             "storage_path", "results_dir", "checkpoint_dir")


def resolve_paths(cfg: TrainConfig, base: Optional[Path] = None) -> TrainConfig:
    """Make every path argument absolute (against the driver's working directory), so Ray workers, whose
    working directory differs, see the same files."""
    base = Path(base or Path.cwd())
    for name in PATH_ARGS:
        value = cfg.get(name)
        if value and "://" not in str(value):   # URIs (s3://...) are left as they are
            cfg.set(name, str((base / Path(value).expanduser()).resolve()))
    return cfg


LOCAL_RUNS_ENV = "MEDLOOM_LOCAL_RUNS"


def local_runs_root(storage_path: str) -> Path:
    """Where run directories live on this machine. A local storage_path is its own root; with a remote one
    (s3://: checkpoints go there, trainer.checkpoint.remote) the run directory stays local, under
    $MEDLOOM_LOCAL_RUNS, else ./runs (git-ignored)."""
    from pipelines.storage import uris as storage

    if storage.is_remote(storage_path):
        return Path(os.environ.get(LOCAL_RUNS_ENV) or "runs").expanduser().resolve()
    return Path(storage_path).expanduser().resolve()


def training_args_json(cfg: TrainConfig) -> str:
    """What a checkpoint's training_args.json holds: the flat upstream names (freeze_vae included)."""
    return json.dumps(cfg.flat(), indent=2, sort_keys=True, default=str)


def _validate_lora(cfg: TrainConfig) -> None:
    """LoRA needs a base checkpoint to adapt; its settings are checked by model.adapters."""
    t = cfg.train
    if not cfg.model.model_path:
        raise ConfigError("finetuning_type lora adapts a base checkpoint: pass --model_path BASE_DIR "
                          "(the adapter checkpoint records it and its sha256)")
    if t.resume_from:
        raise ConfigError("finetuning_type lora: resume_from is not supported; a LoRA run resumes from its own "
                          "checkpoint_dir (--auto_resume True)")
    from model.adapters import AdapterError

    try:
        lora_settings(cfg).check()
    except AdapterError as exc:
        raise ConfigError(str(exc)) from None


def lora_settings(cfg: TrainConfig):
    from model.adapters import LoraSettings

    t = cfg.train
    return LoraSettings(rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout, target=t.lora_target,
                        experts=t.lora_experts, vit=t.lora_vit, connectors=t.lora_connectors)
