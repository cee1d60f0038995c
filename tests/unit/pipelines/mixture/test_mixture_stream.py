"""The mixture stream: determinism, exact resume, the pass split across ranks x workers, world-size change,
group shares, mandatory groups, never-fit samples, and real PackedBatches end to end."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from datasets_catalog.tokenizer import TextTokenizer
from pipelines.mixture.stream import MixtureStream, StreamStateError, merge_states
from pipelines.mixture.config import MixtureConfig
from pipelines.packing.config import PackingConfig
from pipelines.packing.packed_batch import PackedBatch
from tests.helpers.shard_factory import make_catalog, tiny, write_config

PACKING = PackingConfig(expected_num_tokens=1024, max_num_tokens=1280, max_num_tokens_per_sample=1024,
                        prefer_buffer_before=512, max_buffer_size=4)
ROWS = {"vqa": 61, "txt": 41, "ed": 23}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return make_catalog(root, [tiny("vqa", "sft", ROWS["vqa"], long_every=20), tiny("txt", "text_only", ROWS["txt"]),
                               tiny("ed", "edit", ROWS["ed"]), tiny("wordy", "text_only", 30, words=(30, 50))])


def config(catalog, body: str, name: str = "mix.yaml") -> MixtureConfig:
    return MixtureConfig.from_yaml(write_config(catalog.parent / name, f"catalog: {catalog}\n{body}"))


MIX = """
SftJSONLIterableDataset_Ver1: {dataset_names: [vqa], weight: 2}
SftJSONLIterableDataset_TextOnly: {dataset_names: [txt], weight: 1}
MedicalImageEditingIterableDataset_ver1: {dataset_names: [ed], weight: 1, is_mandatory: true}
"""


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.builtin()


@pytest.fixture(scope="module")
def mix(catalog):
    return config(catalog, MIX)


def stream(cfg, tok, **kw) -> MixtureStream:
    return MixtureStream(cfg, PACKING, tok, **kw)


def ids(plan) -> list[str]:
    return [s.sample_id for s in plan.samples]


def take(s: MixtureStream, n: int) -> list[list[str]]:
    return [ids(s.next_plan()) for _ in range(n)]


def test_same_seed_and_epoch_same_stream_other_seed_or_epoch_differs(mix, tok):
    a = take(stream(mix, tok, seed=1), 12)
    assert a == take(stream(mix, tok, seed=1), 12)
    assert a != take(stream(mix, tok, seed=2), 12)
    assert a != take(stream(mix, tok, seed=1, epoch=1), 12)


def test_resume_from_any_point_gives_identical_packs(mix, tok):
    ref = stream(mix, tok, rank=1, world_size=2, seed=3)
    plans = [ref.next_plan() for _ in range(25)]
    for k in range(0, 24, 3):
        state = json.loads(json.dumps(plans[k].state))        # through JSON, like a checkpoint
        resumed = stream(mix, tok, rank=1, world_size=2, seed=3)
        resumed.load_state_dict(state)
        assert take(resumed, 25 - k - 1) == [ids(p) for p in plans[k + 1:]], f"resume after pack {k}"


def test_state_is_small_and_captures_buffer(mix, tok):
    s = stream(mix, tok)
    states = [s.next_plan().state for _ in range(30)]
    assert max(len(json.dumps(st)) for st in states) < 4096
    assert any(st["buffer"] or st["pending"] for st in states)   # the buffer is part of the position


def test_wrong_state_is_refused_with_a_reason(mix, tok):
    state = stream(mix, tok, rank=0, world_size=2).next_plan().state
    with pytest.raises(StreamStateError, match="all old streams"):
        stream(mix, tok, rank=0, world_size=3).load_state_dict(state)
    with pytest.raises(StreamStateError, match="seed"):
        stream(mix, tok, rank=0, world_size=2, seed=99).load_state_dict(state)


def test_every_pack_has_each_mandatory_group_and_respects_budget(mix, tok):
    s = stream(mix, tok, seed=5)
    for _ in range(60):
        plan = s.next_plan()
        assert "ed" in {m.sample.dataset for m in plan.members}
        assert plan.tokens <= PACKING.max_num_tokens
        assert all(m.cost <= PACKING.max_num_tokens_per_sample for m in plan.members)


def test_mandatory_groups_come_first_even_when_a_held_over_sample_is_large(tmp_path, tok):
    """Regression: a sample held over from a full pack used to open the next pack, and when it left no room
    the mandatory sample was pushed out (a pack without the mandatory group: FSDP ranks would skip the
    VAE/ViT collectives). Mandatory samples now come first; the held-over one joins if it fits, else waits
    and is eventually reported; nothing drawn is ever lost."""
    cat = make_catalog(tmp_path, [tiny("ed", "edit", 20), tiny("wordy", "text_only", 30, words=(30, 50))])
    cfg = config(cat, """
MedicalImageEditingIterableDataset_ver1: {dataset_names: [ed], weight: 1, is_mandatory: true}
SftJSONLIterableDataset_TextOnly: {dataset_names: [wordy], weight: 3}
""")
    # ed costs ~90-430 tokens, wordy ~490-610: two wordy samples never share a pack, so one overflows every
    # pack and (buffer of one) is held over to the next
    packing = PackingConfig(expected_num_tokens=900, max_num_tokens=1000, max_num_tokens_per_sample=700,
                            prefer_buffer_before=400, max_buffer_size=1)
    s = MixtureStream(cfg, packing, tok, seed=3)
    s.drawn_log = []
    s.log_draws(s.drawn_log)
    packed, reported = Counter(), Counter()
    for _ in range(150):
        plan = s.next_plan()
        assert "ed" in {m.sample.dataset for m in plan.members}, plan.metrics
        assert plan.tokens <= packing.max_num_tokens and not plan.metrics.get("mandatory_missing")
        packed.update(m.sample.sample_id for m in plan.members)
        reported.update(plan.metrics["skipped_too_long_ids"])
    held = Counter(d.sample.sample_id for d in s.buffer) + Counter([s.pending.sample.sample_id] if s.pending else [])
    drawn = Counter(d.sample.sample_id for d in s.drawn_log)
    assert packed + reported + held == drawn        # every draw is trained, reported or still waiting
    assert sum(packed[i] for i in packed if i.startswith("wordy")) > 100


def _pass0(streams, group: str, rows: int = 0, extra=()) -> list[str]:
    """Sample ids with global position < rows (pass 0) the streams drew (trained, skipped or in flight)."""
    out = []
    for s in streams:
        gi = [g.name for g in s.groups].index(group)
        for d in s.drawn_log:
            if d.group == gi and d.pass_index == 0:
                out.append(d.sample.sample_id)
    return out + list(extra)


def _run_until_pass_done(s: MixtureStream, rows: dict[str, int], max_packs: int = 400) -> None:
    for _ in range(max_packs):
        done = all(s.peek_global(g.index) >= s.orders[g.index].span for g in s.groups)
        if done:
            return
        s.next_plan()
    raise AssertionError("stream did not finish its first pass")


@pytest.mark.parametrize("world_size,num_workers,window", [(1, 1, 4), (2, 1, 1), (3, 1, 1), (3, 1, 4), (2, 2, 1),
                                                         (4, 3, 1)])
def test_union_over_ranks_and_workers_of_one_pass_is_exactly_the_dataset(catalog, tok, world_size, num_workers,
                                                                         window):
    mix = config(catalog, f"shuffle_window_blocks: {window}\n{MIX}", f"mix_w{window}.yaml")   # chunks of 8 / 32
    streams = [stream(mix, tok, rank=r, world_size=world_size, worker_id=w, num_workers=num_workers, seed=7)
               for r in range(world_size) for w in range(num_workers)]
    for s in streams:
        s.drawn_log = []
        s.log_draws(s.drawn_log)
        _run_until_pass_done(s, ROWS)
    for group, name in [("SftJSONLIterableDataset_Ver1", "vqa"), ("SftJSONLIterableDataset_TextOnly", "txt"),
                        ("MedicalImageEditingIterableDataset_ver1", "ed")]:
        got = _pass0(streams, group, ROWS[name])
        assert sorted(got) == sorted(f"{name}:{i}" for i in range(1, ROWS[name] + 1)), (group, Counter(got).most_common(2))


def test_passes_reshuffle(mix, tok):
    s = stream(mix, tok, seed=7)
    s.drawn_log = []
    s.log_draws(s.drawn_log)
    for _ in range(80):
        s.next_plan()
    ed = [d for d in s.drawn_log if d.sample.dataset == "ed"]
    first = [d.sample.sample_id for d in ed if d.pass_index == 0]
    second = [d.sample.sample_id for d in ed if d.pass_index == 1]
    assert sorted(first) == sorted(second) and first != second


def _streams(mix, tok, world_size, num_workers, seed):
    return [stream(mix, tok, rank=r, world_size=world_size, worker_id=w, num_workers=num_workers, seed=seed)
            for r in range(world_size) for w in range(num_workers)]


@pytest.mark.parametrize("window,old_topology,new_topology", [(1, (2, 1), (3, 1)), (4, (2, 1), (3, 1)),
                                                               (1, (1, 2), (3, 2)), (1, (3, 1), (1, 1))])
def test_world_size_two_into_three_continues_the_pass_without_duplicates_or_gaps(catalog, tok, window, old_topology,
                                                                                 new_topology):
    mix = config(catalog, f"shuffle_window_blocks: {window}\n{MIX}", f"mix_w{window}.yaml")
    old = _streams(mix, tok, *old_topology, seed=11)
    for s in old:
        s.drawn_log = []
        s.log_draws(s.drawn_log)
    states = []
    for r, s in enumerate(old):
        for _ in range(3 + 2 * r):   # uneven progress
            state = s.next_plan().state
        states.append(json.loads(json.dumps(state)))
    # trained before the change = drawn minus what was still in flight when the state was taken
    trained_old = []
    for s, st in zip(old, states):
        inflight = {(g, v) for g, v, _ in st["buffer"] + ([st["pending"]] if st["pending"] else [])}
        trained_old += [d for d in s.drawn_log if (d.group, d.v) not in inflight]
    new = _streams(mix, tok, *new_topology, seed=11)
    for s in new:
        s.load_state_dict(states)
        s.drawn_log = []
        s.log_draws(s.drawn_log)
        _run_until_pass_done(s, ROWS)
    for gi, name in enumerate(["vqa", "txt", "ed"]):
        got = [d.sample.sample_id for d in trained_old if d.group == gi and d.pass_index == 0]
        got += _pass0(new, new[0].groups[gi].name, ROWS[name])
        assert sorted(got) == sorted(f"{name}:{i}" for i in range(1, ROWS[name] + 1)), (name, Counter(got).most_common(2))
    # and the new streams are themselves exactly resumable
    plan = new[-1].next_plan()
    again = _streams(mix, tok, *new_topology, seed=11)[-1]
    again.load_state_dict(plan.state)
    assert take(again, 5) == take(new[-1], 5)


def test_merge_needs_every_stream(mix, tok):
    state = stream(mix, tok, rank=0, world_size=2).next_plan().state
    with pytest.raises(StreamStateError, match="missing slots"):
        merge_states([state])


def test_group_shares_within_two_points_over_10000_draws(catalog, tok):
    cfg = config(catalog, """
SftJSONLIterableDataset_Ver1: {dataset_names: [vqa], weight: 0.5}
SftJSONLIterableDataset_TextOnly: {dataset_names: [txt], weight: 0.3}
MedicalImageEditingIterableDataset_ver1: {dataset_names: [ed], weight: 0.2}
""", "shares.yaml")
    s = stream(cfg, tok, seed=13)
    counts = Counter(s.choose_group() for _ in range(10_000))
    for gi, w in enumerate([0.5, 0.3, 0.2]):
        assert abs(counts[gi] / 10_000 - w) < 0.02


def test_weight_unit_tokens_matches_token_shares(catalog, tok):
    cfg = config(catalog, """
weight_unit: tokens
SftJSONLIterableDataset_TextOnly:
  dataset_names: {short: [txt], wordy: [wordy]}
  weight: {short: 0.5, wordy: 0.5}
""", "tokens.yaml")
    s = stream(cfg, tok, seed=17)
    for _ in range(150):
        s.next_plan()
    tokens = s.stats["tokens"]
    share = tokens[0] / sum(tokens)
    assert abs(share - 0.5) < 0.05, share
    samples = s.stats["samples"]
    assert samples[0] / sum(samples) > 0.6   # sample shares differ: token weighting did something


def test_too_long_samples_are_counted_and_reported_never_packed(mix, tok):
    s = stream(mix, tok, seed=19)
    reported = []
    for _ in range(60):
        plan = s.next_plan()
        reported += plan.metrics["skipped_too_long_ids"]
        assert plan.metrics["samples_skipped_too_long"] == len(reported)
    assert reported and all(int(r.split(":")[1]) % 20 == 0 for r in reported)


def test_overflowing_sample_waits_instead_of_being_dropped(catalog, tok):
    cfg = config(catalog, "SftJSONLIterableDataset_Ver1: {dataset_names: [vqa]}\n", "one.yaml")
    tight = PackingConfig(expected_num_tokens=600, max_num_tokens=640, max_num_tokens_per_sample=600,
                          prefer_buffer_before=300, max_buffer_size=0)
    s = MixtureStream(cfg, tight, tok, seed=23)
    s.drawn_log = []
    s.log_draws(s.drawn_log)
    packed = []
    for _ in range(40):
        packed += [m.sample.sample_id for m in s.next_plan().members]
    waiting = {s.pending.sample.sample_id} if s.pending else set()
    fit = [d.sample.sample_id for d in s.drawn_log if d.cost <= 600]
    assert sorted(fit) == sorted(packed + list(waiting))   # every drawn sample that fits is packed (or next)


def test_real_packed_batches_end_to_end(mix, tok):
    s = stream(mix, tok, seed=29)
    it = iter(s)
    batches = [next(it) for _ in range(3)]
    for b in batches:
        assert isinstance(b, PackedBatch)
        assert b.sequence_length <= PACKING.max_num_tokens
        assert {"packing_efficiency", "tokens_per_group", "samples_per_group", "samples_skipped_too_long"} <= set(b.metrics)
        assert [set(d) for d in b.batch_data_indexes] == [{"sample_id", "dataset", "group"}] * len(b.batch_data_indexes)
    resumed = stream(mix, tok, seed=29)
    resumed.load_state_dict(batches[0].stream_state)
    again = next(iter(resumed))
    assert again.batch_data_indexes == batches[1].batch_data_indexes
    assert again.packed_text_ids.equal(batches[1].packed_text_ids)
    assert again.sample_lens == batches[1].sample_lens


def test_streams_read_each_row_group_about_once_per_pass(catalog, tok):
    """Whole chunks per stream: 4 streams together read the 8 row groups of vqa about once, not 4 times."""
    cfg = config(catalog, "shuffle_window_blocks: 1\nsft: {dataset_names: [vqa]}\n", "reads.yaml")
    streams = [stream(cfg, tok, rank=r, world_size=4, seed=31) for r in range(4)]
    for s in streams:
        _run_until_pass_done(s, ROWS)
    n_row_groups = len(streams[0].groups[0].datasets[0].layout.rg_rows)
    reads = sum(s._meta_cache.reads for s in streams)
    assert n_row_groups == 8 and reads <= 2 * n_row_groups + len(streams), reads
