"""A shard file that does not read is named, with the ingest command that rebuilds it
(pipelines/storage/shard_reader.py ShardReadError), whether its footer is gone or a row group is damaged."""
from __future__ import annotations

import pickle

import pytest

from pipelines.storage.shard_reader import RowGroupCache, ShardLayout, ShardReadError
from tests.helpers.shard_factory import make_catalog, tiny


@pytest.fixture()
def part(tmp_path):
    make_catalog(tmp_path, [tiny("vqa", "sft", 16)])
    return sorted((tmp_path / "shards" / "vqa").glob("part-*.parquet"))[0]


def test_a_truncated_file_fails_at_its_footer_naming_it(part):
    part.write_bytes(part.read_bytes()[:-20])
    with pytest.raises(ShardReadError) as info:
        ShardLayout.scan([part])
    assert str(info.value).startswith(f"{part}: shard file is unreadable (")
    assert str(info.value).endswith("re-run the ingest with --force --only vqa (python jobs/ingest.py CATALOG "
                                    "--force --only vqa)")


def test_a_damaged_row_group_fails_when_read_naming_file_and_row_group(part):
    data = bytearray(part.read_bytes())
    data[8: len(data) // 2] = b"\x55" * (len(data) // 2 - 8)     # pages overwritten, footer intact
    part.write_bytes(bytes(data))
    assert ShardLayout.scan([part]).rows == 16                    # the footer still reads
    with pytest.raises(ShardReadError) as info:
        RowGroupCache().table(part, 0, None)
    assert str(info.value).startswith(f"{part}: row group 0: shard file is unreadable (")
    assert info.value.dataset == "vqa"


def test_a_missing_file_is_named(tmp_path):
    gone = tmp_path / "shards" / "vqa" / "part-00003.parquet"
    with pytest.raises(ShardReadError, match=r"part-00003.parquet: shard file is missing; re-run the ingest with "
                                             r"--force --only vqa"):
        ShardLayout.scan([gone])


def test_the_error_crosses_a_process_boundary_whole():
    exc = ShardReadError("/s/vqa/part-00000.parquet", "row group 2: shard file is unreadable (x)", "/c/cat.yaml")
    back = pickle.loads(pickle.dumps(exc))
    assert (str(back), back.path, back.problem, back.dataset) == (str(exc), exc.path, exc.problem, "vqa")
