"""rollbacks.json: one record per rollback after loss spikes, read back typed; a damaged file is one
line naming it, and appending never loses the records already there."""

import json

import pytest

from tinytrain.errors import CheckpointError
from tinytrain.store.rollbacks import ROLLBACKS, Rollback, read_rollbacks, record_rollback


def test_records_append_and_read_back(tmp_path):
    assert read_rollbacks(tmp_path) == []
    first = Rollback([5, 6], 4, 96, 32, [5, 6])
    record_rollback(tmp_path, first)
    record_rollback(tmp_path, Rollback([9], 8, 160, 16, [9, 9]))
    back = read_rollbacks(tmp_path)
    assert back[0] == first and [r.to_checkpoint_step for r in back] == [4, 8]
    assert json.loads((tmp_path / ROLLBACKS).read_text())[1]["resume_at_sample"] == 160


@pytest.mark.parametrize("text,message", [("{not json", "not valid JSON"), ('{"a": 1}', "expected a list"),
                                          ('[{"to_checkpoint_step": 4}]', "not a rollback record")])
def test_a_damaged_file_is_one_error_naming_it_and_is_left_alone(tmp_path, text, message):
    (tmp_path / ROLLBACKS).write_text(text)
    with pytest.raises(CheckpointError, match=message) as e:
        read_rollbacks(tmp_path)
    assert str(tmp_path / ROLLBACKS) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError):
        record_rollback(tmp_path, Rollback([5], 4, 96, 32, [5, 5]))
    assert (tmp_path / ROLLBACKS).read_text() == text
