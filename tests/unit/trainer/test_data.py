"""trainer.data: the mixture YAML is parsed once; the parsed config travels to loader processes by pickle."""
from __future__ import annotations


def test_the_parsed_mixture_travels_pickled(tmp_path):
    """The mixture YAML is parsed once per run; loader processes (and Ray) get the parsed config by pickle."""
    import pickle

    from pipelines.packing.config import PackingConfig
    from trainer.data import StreamFactory, generation_groups, load_mixture, mandatory_coverage

    path = tmp_path / "mix.yaml"
    path.write_text("catalog: cat.yaml\nshards: s3://bucket/shards?region=us-east-1\n"
                    "sft: {dataset_names: [a], weight: 2}\nt2i: {dataset_names: [b], weight: 1, is_mandatory: true}\n"
                    "train: {lr: 1.0e-4, nested: {steps: [1, 2]}}\n")
    mixture = load_mixture(str(path))
    assert load_mixture(mixture) is mixture
    assert generation_groups(mixture) == generation_groups(str(path)) == ["t2i"]
    assert mandatory_coverage(mixture) == mandatory_coverage(str(path))
    factory = StreamFactory(mixture=mixture, packing=PackingConfig(), tokenizer_spec=None, rank=0, world_size=1,
                            seed=0)
    again = pickle.loads(pickle.dumps(factory))
    assert again == factory and again.mixture.shards.display() == "s3://bucket/shards"
