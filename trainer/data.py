"""The per-rank batch source: the mixture stream (pipelines.mixture) behind a picklable factory, so it can
be built inside a background loader process and restored from a checkpoint's exact stream state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from pipelines.packing_config import PackingConfig


@dataclass
class StreamFactory:
    """Builds `MixtureStream` for one rank, restores `state`, and yields PackedBatch forever."""
    mixture_path: str
    packing: PackingConfig
    tokenizer_spec: Optional[str]
    rank: int
    world_size: int
    seed: int
    state: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self):
        from datasets_catalog.tokenizer import TextTokenizer
        from pipelines.mixture import MixtureStream
        from pipelines.mixture_config import MixtureConfig

        cfg = MixtureConfig.from_yaml(self.mixture_path)
        tok = TextTokenizer.load(self.tokenizer_spec)
        stream = MixtureStream(cfg, self.packing, tok, rank=self.rank, world_size=self.world_size,
                               worker_id=0, num_workers=1, seed=self.seed, **self.extra)
        if self.state is not None:
            stream.load_state_dict(self.state)
        return stream

    def __call__(self) -> Iterator[Any]:
        return iter(self.build())


def generation_groups(mixture_path: str) -> list[str]:
    """Names of mixture groups whose task emits noised VAE targets (needed when visual_gen is on)."""
    from pipelines.mixture_config import MixtureConfig

    cfg = MixtureConfig.from_yaml(mixture_path)
    return [g.name for g in cfg.groups if g.task.generation and g.weight > 0]


def group_names(mixture_path: str) -> list[str]:
    from pipelines.mixture_config import MixtureConfig

    return MixtureConfig.from_yaml(mixture_path).group_names
