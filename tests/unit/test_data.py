import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from srpo_ray.data.parquet import DataError, load_prompts, write_verl_parquet
from srpo_ray.data.registry import builtin_dataset_path
from srpo_ray.records import CodeSpec


def verl_row(question="What is 1+1?", truth="2", ability="math", **extra):
    return {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": question}],
            "ability": ability, "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"split": "train", "index": 0, **extra}}


def test_verl_math_rows_load_with_stable_content_ids(tmp_path):
    path = tmp_path / "math.parquet"
    write_verl_parquet([verl_row(), verl_row("What is 2+2?", "4")], path)
    first, second = load_prompts([str(path)]), load_prompts([str(path)])
    assert [p.prompt_id for p in first] == [p.prompt_id for p in second]
    assert len({p.prompt_id for p in first}) == 2
    assert first[0].domain == "math" and first[0].ground_truth == "2"
    assert first[0].messages == [{"role": "user", "content": "What is 1+1?"}]


def test_explicit_ids_are_used_and_conflicts_rejected(tmp_path):
    path = tmp_path / "ids.parquet"
    write_verl_parquet([verl_row(id="q1"), verl_row("other", "3", id="q2")], path)
    assert sorted(p.prompt_id for p in load_prompts([str(path)])) == ["q1", "q2"]
    clash = tmp_path / "clash.parquet"
    write_verl_parquet([verl_row(id="q1"), verl_row("different question", "3", id="q1")], clash)
    with pytest.raises(DataError, match=r"clash\.parquet row 1: id 'q1'"):
        load_prompts([str(clash)])


def test_exact_duplicates_are_kept_once(tmp_path):
    path = tmp_path / "dup.parquet"
    write_verl_parquet([verl_row(), verl_row()], path)
    assert len(load_prompts([str(path)])) == 1


@pytest.mark.parametrize("row, message", [
    (verl_row(ability="poetry"), "unknown domain 'poetry'"),
    ({**verl_row(), "reward_model": {"style": "rule", "ground_truth": None}}, "ground_truth is missing"),
    ({**verl_row(), "prompt": []}, "non-empty list of chat messages"),
    ({**verl_row(), "prompt": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
    (verl_row(truth=""), "ground_truth is empty"),
    (verl_row(ability="code", truth="not json tests"), "row 0"),
])
def test_bad_rows_name_file_row_and_problem(tmp_path, row, message):
    path = tmp_path / "bad.parquet"
    write_verl_parquet([row], path)
    with pytest.raises(DataError, match=message) as err:
        load_prompts([str(path)])
    assert "bad.parquet row 0" in str(err.value)


def test_missing_columns_and_files_are_clear(tmp_path):
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"question": ["hi"]}), path)
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt', 'reward_model'\]"):
        load_prompts([str(path)])
    with pytest.raises(DataError, match="does not exist"):
        load_prompts([str(tmp_path / "nope.parquet")])
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        load_prompts([str(junk)])


def test_plain_string_prompt_and_numeric_truth(tmp_path):
    path = tmp_path / "plain.parquet"
    write_verl_parquet([{**verl_row(truth="5"), "prompt": "What is 2+3?"}], path)
    (p,) = load_prompts([str(path)])
    assert p.messages == [{"role": "user", "content": "What is 2+3?"}]


def test_code_rows_in_livecodebench_and_taco_encodings(tmp_path):
    lcb = json.dumps([{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}])
    taco = json.dumps({"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]})
    path = tmp_path / "code.parquet"
    write_verl_parquet([verl_row("sum", lcb, "code"), verl_row("add", taco, "code")], path)
    stdin, func = load_prompts([str(path)])
    assert isinstance(stdin.ground_truth, CodeSpec) and stdin.ground_truth.cases[0].testtype == "stdin"
    assert func.ground_truth.fn_name == "add" and func.ground_truth.cases[0].testtype == "functional"


def test_builtin_set_has_both_domains(tmp_path):
    path = builtin_dataset_path("tiny_math_code", str(tmp_path))
    prompts = load_prompts([str(path)])
    assert {p.domain for p in prompts} == {"math", "code"}
    assert load_prompts(["builtin:tiny_math_code"], ) and path.exists()
    with pytest.raises(DataError, match="unknown builtin dataset"):
        load_prompts(["builtin:nope"])
