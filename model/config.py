"""Model configuration (docs/upstream-compat.md#model-construction, #model-components, #checkpoint-loading): LLM (Qwen2), ViT (SigLIP), VAE (FLUX AE) and the
unified-model switches, as plain dataclasses.

`ModelConfig.from_checkpoint_dir` reads `llm_config.json` / `vit_config.json` of an upstream (or our own)
checkpoint directory and applies the loader overrides of docs/upstream-compat.md#checkpoint-loading. The ViT layer count is always kept
*untruncated* in `ViTConfig.num_hidden_layers`; the layer drop (`select_layer`) is applied when the module is
built, so writing the config back never truncates twice (docs/upstream-compat.md#vit-layer-count).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

LAYER_MODULES = ("Qwen2DecoderLayer", "Qwen2MoEDecoderLayer", "Qwen2MoTDecoderLayer")
ATTN_BACKENDS = ("auto", "sdpa", "flex", "flash", "varlen")
VIT_TRUNCATION_KEY = "medloom_vit_truncation"  # recorded in vit_config.json next to the untruncated count


class ConfigError(ValueError):
    """A checkpoint config file is missing or has a bad field; the message names file and field."""


def _pick(cls, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in fields(cls)}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return known, extra


@dataclass
class LLMConfig:
    """Qwen2 decoder. Defaults are the released 7B values (docs/upstream-compat.md#model-components); always read them from llm_config.json."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    qk_norm: bool = True
    layer_module: str = "Qwen2MoTDecoderLayer"
    freeze_und: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # other llm_config.json keys, written back untouched

    def __post_init__(self) -> None:
        if self.layer_module not in LAYER_MODULES:
            raise ConfigError(
                f"layer_module {self.layer_module!r} is not a decoder layer class; use one of {LAYER_MODULES} "
                f"(note: UniMedVL's default 'Qwen2MoTDecoderLayer_with_hidden_outputs' is not valid)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        for key in ("rope_scaling", "rope_parameters"):
            scaling = self.extra.get(key)
            if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default":
                raise ConfigError(f"llm_config.json: {key} {scaling} is not supported (Qwen2.5-7B uses plain RoPE)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def use_moe(self) -> bool:
        """MoE and MoT layers both route tokens and carry a `norm_moe_gen` final norm."""
        return "Mo" in self.layer_module

    def to_json_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "extra"}
        rope_params = dict(self.extra.get("rope_parameters") or {})
        if rope_params:
            rope_params["rope_theta"] = self.rope_theta
        out = {**self.extra, **data, "model_type": "qwen2", "head_dim": self.head_dim}
        if rope_params:
            out["rope_parameters"] = rope_params
        return out

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "LLMConfig":
        data = dict(data)
        if "rope_theta" not in data and isinstance(data.get("rope_parameters"), dict):
            data["rope_theta"] = data["rope_parameters"].get("rope_theta", cls.rope_theta)
        known, extra = _pick(cls, data)
        known.pop("extra", None)
        extra.pop("head_dim", None)
        return cls(**known, extra=extra)


@dataclass
class ViTConfig:
    """SigLIP (so400m NaViT). `num_hidden_layers` is the UNTRUNCATED count; `num_layers_used` is what is built."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    select_layer: int = -2       # vit_select_layer: keep n + 1 + select_layer layers (drops the last one)
    rope: bool = False           # vit_rope; the released checkpoints use learned positions only
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers_used(self) -> int:
        return self.num_hidden_layers + 1 + self.select_layer

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    def to_json_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("extra", "select_layer")}
        data[VIT_TRUNCATION_KEY] = {"vit_select_layer": self.select_layer, "num_layers_used": self.num_layers_used,
                                    "num_hidden_layers_is_untruncated": True}
        return {**self.extra, **data, "model_type": "siglip_vision_model"}

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], select_layer: int = -2) -> "ViTConfig":
        known, extra = _pick(cls, data)
        known.pop("extra", None)
        known.pop("select_layer", None)
        extra.pop(VIT_TRUNCATION_KEY, None)
        return cls(**known, select_layer=select_layer, extra=extra)


@dataclass
class VAEConfig:
    """FLUX autoencoder (docs/upstream-compat.md#model-components). `norm_groups` is 32 upstream; tiny configs use fewer channels."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class ModelConfig:
    """BagelConfig (docs/upstream-compat.md#model-construction) plus the LLM/ViT/VAE configs.

    `layer_module`, `qk_norm`, `tie_word_embeddings` and `freeze_und` live on `llm` (as upstream) and are
    exposed here as properties.
    """

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    visual_gen: bool = True
    visual_und: bool = True
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0
    attn_backend: str = "auto"   # auto | sdpa | flex | flash | varlen (see model/attention.py)

    def __post_init__(self) -> None:
        if self.attn_backend not in ATTN_BACKENDS:
            raise ConfigError(f"attn_backend {self.attn_backend!r} is not one of {ATTN_BACKENDS}")
        if self.visual_und and self.vit.num_positions < self.vit_max_num_patch_per_side ** 2:
            raise ConfigError(
                f"vit_max_num_patch_per_side {self.vit_max_num_patch_per_side} needs "
                f"{self.vit_max_num_patch_per_side ** 2} ViT positions but the ViT table has {self.vit.num_positions} "
                f"(image_size {self.vit.image_size} / patch {self.vit.patch_size})")

    # -- upstream names that live on the LLM config -------------------------------------------
    layer_module = property(lambda self: self.llm.layer_module,
                            lambda self, v: setattr(self.llm, "layer_module", v))
    qk_norm = property(lambda self: self.llm.qk_norm, lambda self, v: setattr(self.llm, "qk_norm", v))
    tie_word_embeddings = property(lambda self: self.llm.tie_word_embeddings,
                                   lambda self, v: setattr(self.llm, "tie_word_embeddings", v))
    freeze_und = property(lambda self: self.llm.freeze_und, lambda self, v: setattr(self.llm, "freeze_und", v))

    @property
    def latent_channels(self) -> int:
        """p*p*z: the width of one latent token (64 for the released layout)."""
        return self.latent_patch_size ** 2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        return self.vae.downsample * self.latent_patch_size

    def bagel_json_dict(self) -> dict[str, Any]:
        """What `config.json` holds: the unified-model switches and the VAE config (not stored upstream)."""
        return {
            "visual_gen": self.visual_gen, "visual_und": self.visual_und,
            "latent_patch_size": self.latent_patch_size, "max_latent_size": self.max_latent_size,
            "vit_max_num_patch_per_side": self.vit_max_num_patch_per_side, "connector_act": self.connector_act,
            "interpolate_pos": self.interpolate_pos, "timestep_shift": self.timestep_shift,
            "vit_select_layer": self.vit.select_layer, "vae_config": asdict(self.vae),
            "medloom_format": 1,
        }

    def with_overrides(self, **overrides: Any) -> "ModelConfig":
        """Copy with top-level fields and the four LLM-level names replaced."""
        cfg = replace(self, llm=replace(self.llm), vit=replace(self.vit), vae=replace(self.vae))
        for key, value in overrides.items():
            if key in ("layer_module", "qk_norm", "tie_word_embeddings", "freeze_und"):
                setattr(cfg.llm, key, value)
            elif key == "vit_select_layer":
                cfg.vit.select_layer = value
            elif key == "vit_rope":
                cfg.vit.rope = value
            elif key in {f.name for f in fields(ModelConfig)}:
                setattr(cfg, key, value)
            else:
                raise ConfigError(f"unknown model override {key!r}")
        cfg.llm.__post_init__()
        cfg.__post_init__()
        return cfg

    # -- presets ------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, vocab_size: int = 261, **overrides: Any) -> "ModelConfig":
        """A few million parameters, every component present; trains on a CPU in seconds.

        ViT patch 14 / 70 positions per side and VAE downsample 8 x latent patch 2 = 16 are kept, so the
        shared data transforms and packing defaults work unchanged; only widths and depths shrink.
        """
        cfg = cls(
            llm=LLMConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          rope_theta=10000.0),
            vit=ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2),
            vae=VAEConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4),
            max_latent_size=32,
        )
        return cfg.with_overrides(**overrides) if overrides else cfg

    @classmethod
    def unimedvl_7b(cls, **overrides: Any) -> "ModelConfig":
        """The released BAGEL-7B-MoT / UniMedVL layout (docs/upstream-compat.md#model-components, #state-dict-keys, #checkpoint-loading inference BagelConfig)."""
        cfg = cls(llm=LLMConfig(), vit=ViTConfig(), vae=VAEConfig(), max_latent_size=64)
        return cfg.with_overrides(**overrides) if overrides else cfg

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path, **overrides: Any) -> "ModelConfig":
        """llm_config.json + vit_config.json (+ our config.json if present) with the docs/upstream-compat.md#checkpoint-loading overrides.

        Overrides applied as upstream loaders do: qk_norm=True, tie_word_embeddings=False,
        layer_module=Qwen2MoTDecoderLayer, ViT rope=False, and the ViT keeps n + 1 + vit_select_layer layers.
        The stored count is treated as untruncated unless vit_config.json records otherwise.
        """
        path = Path(path)
        llm_data = _read_json(path / "llm_config.json")
        vit_data = _read_json(path / "vit_config.json")
        bagel = _read_json(path / "config.json") if (path / "config.json").exists() else {}
        if not bagel.get("medloom_format"):
            bagel = {}  # an upstream/HF config.json: use the released BagelConfig values (docs/upstream-compat.md#checkpoint-loading)
        llm = LLMConfig.from_json_dict({**llm_data, "qk_norm": True, "tie_word_embeddings": False,
                                        "layer_module": "Qwen2MoTDecoderLayer", "freeze_und": False})
        select_layer = int(bagel.get("vit_select_layer", -2))
        trunc = vit_data.get(VIT_TRUNCATION_KEY)
        if isinstance(trunc, dict) and trunc.get("num_hidden_layers_is_untruncated") is False:
            vit_data = {**vit_data, "num_hidden_layers": int(vit_data["num_hidden_layers"]) - 1 - select_layer}
        vit = ViTConfig.from_json_dict({**vit_data, "rope": False}, select_layer=select_layer)
        vae_data = bagel.get("vae_config")
        vae = VAEConfig(**vae_data) if isinstance(vae_data, dict) else VAEConfig()
        keys = ("visual_gen", "visual_und", "latent_patch_size", "max_latent_size", "vit_max_num_patch_per_side",
                "connector_act", "interpolate_pos", "timestep_shift")
        top = {k: bagel[k] for k in keys if k in bagel}
        cfg = cls(llm=llm, vit=vit, vae=vae, **{"max_latent_size": 64, **top})
        return cfg.with_overrides(**overrides) if overrides else cfg


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: file not found (a checkpoint directory needs llm_config.json and "
                          f"vit_config.json, docs/upstream-compat.md#checkpoint-loading)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data
