"""Prompt files and result files of ``farm submit``: pure parsing, no Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.files import (PromptFileError, ResultFileError, Written, check_named, check_rows, choose_job_id,
                            detect_format, iter_rows, result_line, scan_results)
from producer.jobs.fingerprint import fingerprint_of
from protocol.schema import GenerationResult, Limits

LIMITS = Limits()


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_jsonl_rows_keep_their_line_numbers_and_skip_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "a", "max_new_tokens": 3}\n\n"b"\n'
                                       '{"messages": [{"role": "user", "content": "c"}]}\n')
    rows = list(iter_rows(path))
    assert [r.line for r in rows] == [1, 3, 4]
    assert rows[0].data == {"prompt": "a", "max_new_tokens": 3}
    assert rows[1].data == {"prompt": "b"}
    assert rows[2].data["messages"][0]["content"] == "c"


@pytest.mark.parametrize(("text", "message"), [
    ('{"prompt": "a"}\n{"prompt": "b",\n', "p.jsonl line 2: not valid JSON"),
    ('{"prompt": "a"}\n[1, 2]\n', "p.jsonl line 2: must be a JSON object or string, got list"),
    ('{"prompt": "a"}\n\n{"prompt": "b", "max_new_tokens": 0}\n', "p.jsonl line 3: max_new_tokens: must be between"),
    ('{"prompt": "a", "beams": 2}\n', "p.jsonl line 1: beams: unknown parameter"),
    ('{"prompt": ""}\n', "p.jsonl line 1: prompt: is empty"),
    ('{"max_new_tokens": 3}\n', "p.jsonl line 1: prompt: give exactly one of prompt or messages"),
    ("\n\n", "p.jsonl: has no prompts"),
])
def test_a_bad_jsonl_row_is_named_by_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "p.jsonl", text)
    with pytest.raises(PromptFileError) as caught:
        check_rows(path, {}, LIMITS)
    assert str(caught.value).startswith(f"{tmp_path}/{message}")
    assert "\n" not in str(caught.value)


def test_job_parameters_are_checked_with_each_row(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '"a"\n{"prompt": "b", "max_new_tokens": 2000}\n')
    with pytest.raises(PromptFileError, match="line 2: max_new_tokens"):
        check_rows(path, {"max_new_tokens": 4}, LIMITS)
    with pytest.raises(PromptFileError, match="line 1: temperature"):
        check_rows(path, {"temperature": 9.0}, LIMITS)


def test_unreadable_files_give_one_line(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match=r"missing.jsonl: cannot read: No such file or directory$"):
        list(iter_rows(tmp_path / "missing.jsonl"))
    with pytest.raises(PromptFileError, match="cannot read: Is a directory"):
        list(iter_rows(tmp_path))
    path = write(tmp_path / "p.txt", b"fine\nbad \xff byte\n")
    with pytest.raises(PromptFileError, match=r"p.txt line 2: not valid UTF-8"):
        list(iter_rows(path))


def test_text_files_are_one_prompt_per_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "\ufefffirst line\r\n\r\n  second, indented  \nthird")
    assert [(r.line, r.data) for r in iter_rows(path)] == [
        (1, {"prompt": "first line"}), (3, {"prompt": "  second, indented  "}), (4, {"prompt": "third"})]


def test_csv_rows_take_the_prompt_column_and_typed_parameters(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", 'id,text,max_new_tokens,temperature,ignore_eos,stop\n'
                                     '7,"hello, world",5,,true,\n'
                                     '8,"two\nlines",,0.5,no,END\n')
    rows = list(iter_rows(path, column="text"))
    assert rows[0].data == {"prompt": "hello, world", "max_new_tokens": 5, "ignore_eos": True}
    assert rows[1].data == {"prompt": "two\nlines", "temperature": 0.5, "ignore_eos": False, "stop": "END"}
    assert rows[1].line == 4  # a quoted newline spans two lines of the file
    assert check_rows(path, {}, LIMITS, column="text").rows == 2


def test_csv_errors_name_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "prompt,max_new_tokens\na,3\nb,many\n")
    with pytest.raises(PromptFileError, match="p.csv line 3: max_new_tokens: must be an integer, got 'many'"):
        list(iter_rows(path))
    with pytest.raises(PromptFileError, match=r"line 1: no 'text' column in the header \(prompt, max_new_tokens\)"):
        list(iter_rows(path, column="text"))
    tsv = write(tmp_path / "p.tsv", "prompt\tseed\nhello\t3\n")
    assert [r.data for r in iter_rows(tsv)] == [{"prompt": "hello", "seed": 3}]


def test_format_is_chosen_by_extension_unless_given(tmp_path: Path) -> None:
    assert detect_format(Path("a.JSONL")) == "jsonl"
    assert detect_format(Path("a.csv")) == "csv"
    assert detect_format(Path("a.prompts")) == "text"
    path = write(tmp_path / "p.txt", '{"prompt": "x"}\n')
    assert [r.data for r in iter_rows(path, "jsonl")] == [{"prompt": "x"}]
    assert [r.data for r in iter_rows(path)] == [{"prompt": '{"prompt": "x"}'}]


def test_fingerprint_follows_rows_and_parameters(tmp_path: Path) -> None:
    one = check_rows(write(tmp_path / "a.jsonl", '"x"\n"y"\n'), {}, LIMITS)
    same = check_rows(write(tmp_path / "b.txt", "x\n\ny\n"), {}, LIMITS)
    assert one == same and one.rows == 2
    assert check_rows(tmp_path / "a.jsonl", {"max_new_tokens": 3}, LIMITS).fingerprint != one.fingerprint
    assert check_rows(write(tmp_path / "c.txt", "y\nx\n"), {}, LIMITS).fingerprint != one.fingerprint


def test_adapters_named_by_rows_are_refused_with_the_first_line_naming_them(tmp_path: Path) -> None:
    # Line 2 is blank: the row on line 3 is the second row (index 1), and its line is what is named.
    path = write(tmp_path / "p.jsonl", '{"prompt": "a", "adapter": "second"}\n\n'
                                       '{"prompt": "b", "adapter": "nosuch"}\n{"prompt": "c", "adapter": "nosuch"}\n')
    offered = Limits(adapters=("base", "second"))
    summary = check_rows(path, {}, LIMITS)  # offline: adapters unknown, listed for later
    assert sorted(summary.named) == [("adapter", "nosuch", 3), ("adapter", "second", 1)]
    message = f"{path} line 3: adapter: unknown adapter 'nosuch' (offered: base, second)"
    with pytest.raises(PromptFileError) as late:
        check_named(path, summary, offered)
    with pytest.raises(PromptFileError) as known:
        check_rows(path, {}, offered)  # adapters known up front: the same message
    assert str(late.value) == str(known.value) == message
    check_named(path, summary, LIMITS)  # no worker online: the worker checks again
    check_named(path, check_rows(path, {}, LIMITS), Limits(adapters=("nosuch", "second")))


@pytest.mark.parametrize(("name", "text", "line"), [
    ("p.jsonl", '"a"\n\n\n{"prompt": "b", "top_p": 7}\n', 4),
    ("p.txt", "a\n\nb\n" + "c" * 20000 + "\n", 4),
    ("p.csv", "prompt,adapter\na,base\n\nb,nosuch\n", 4),
    ("p.csv", "prompt,top_k\na,1\n\"multi\nline\",-1\n", 4),  # a record spanning lines: its last one
])
def test_every_row_error_names_the_1_based_line_of_the_file(tmp_path: Path, name: str, text: str, line: int) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(PromptFileError) as caught:
        check_rows(path, {}, Limits(adapters=("base",)))
    assert caught.value.line == line and str(caught.value).startswith(f"{path} line {line}: ")


def test_the_fingerprint_of_a_file_is_that_of_its_rows_given_to_the_api(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '"x"\n{"prompt": "y", "seed": 3}\n')
    summary = check_rows(path, {"max_new_tokens": 4}, LIMITS)
    assert summary.fingerprint == fingerprint_of(["x", {"prompt": "y", "seed": 3}], {"max_new_tokens": 4})
    assert summary.fingerprint != fingerprint_of(["x", {"prompt": "y", "seed": 4}], {"max_new_tokens": 4})


# --- result files -------------------------------------------------------------------------------
def lines(job_id: str, count: int, failed: tuple[int, ...] = ()) -> str:
    out = []
    for i in range(count):
        result = GenerationResult(id=f"{job_id}:{i}", text=f"t{i}")
        if i in failed:
            result = GenerationResult(id=f"{job_id}:{i}", finish_reason="error", error={"code": "x", "message": "y"})
        out.append(result_line(job_id, i, result))
    return "".join(out)


def test_scan_results_counts_complete_lines_and_drops_a_torn_last_one(tmp_path: Path) -> None:
    assert scan_results(tmp_path / "none.jsonl") == Written()
    complete = lines("j1", 3, failed=(1,))
    path = write(tmp_path / "out.jsonl", complete + '{"index": 3, "job_id": "j1", "te')
    assert scan_results(path) == Written(rows=3, job_id="j1", failed=1, size=len(complete.encode()))
    write(path, complete)
    assert scan_results(path).size == path.stat().st_size


@pytest.mark.parametrize(("text", "message"), [
    ("hello\n", "line 1: not a result line of farm submit"),
    (lines("j1", 2) + lines("j1", 1), "line 3: holds row 0, expected row 2"),
    (lines("j1", 1) + lines("j2", 2).splitlines(keepends=True)[1], "line 2: result of job j2, earlier lines of job j1"),
])
def test_scan_results_refuses_a_file_it_did_not_write(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ResultFileError, match=message):
        scan_results(write(tmp_path / "out.jsonl", text))


def test_result_lines_hold_index_job_and_result_fields() -> None:
    record = json.loads(result_line("j", 4, GenerationResult(id="j:4", text="é", completion_tokens=2)))
    assert record["index"] == 4 and record["job_id"] == "j" and record["id"] == "j:4"
    assert record["text"] == "é" and record["completion_tokens"] == 2 and record["error"] is None


def test_job_id_comes_from_the_option_the_output_or_the_prompts(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert choose_job_id(None, Written(), "ab" * 32, out) == "j" + ("ab" * 10)
    assert choose_job_id(None, Written(2, "mine"), "ab" * 32, out) == "mine"
    assert choose_job_id("mine", Written(2, "mine"), "ab" * 32, out) == "mine"
    assert choose_job_id("new", Written(), "ab" * 32, out) == "new"
    with pytest.raises(ResultFileError, match="holds results of job mine, not other"):
        choose_job_id("other", Written(2, "mine"), "ab" * 32, out)
