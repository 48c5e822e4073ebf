import pytest

from common.errors import UserError
from eval.cli import read_qa


def test_read_qa_reads_the_first_n(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "1+1", "answer": "#### 2"}\n\n{"question": "2+2", "answer": "#### 4"}\n')
    assert [r["question"] for r in read_qa(f, 10)] == ["1+1", "2+2"]
    assert len(read_qa(f, 1)) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "1+1", "answer": "2"}\n{not json\n', "qa.jsonl:2: not valid JSON"),
        ('{"question": "1+1"}\n', 'qa.jsonl:1: expected an object with "question" and "answer"'),
        ("\n", "qa.jsonl: no questions"),
    ],
)
def test_read_qa_bad_input_names_file_and_line(tmp_path, content, message):
    f = tmp_path / "qa.jsonl"
    f.write_text(content)
    with pytest.raises(UserError, match=message):
        read_qa(f, 10)


def test_read_qa_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        read_qa(tmp_path / "nope.jsonl", 10)


def test_read_qa_invalid_utf8_names_file_line_and_byte(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_bytes(b'{"question": "1+1", "answer": "2"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(UserError, match=r"qa\.jsonl: invalid UTF-8 at byte 52 \(line 2\)"):
        read_qa(f, 10)
