import json

import pytest

from sd2.data import default_prompts_file, encode_prompt, load_prompts, read_prompts, select
from sd2.errors import UserError


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_formats(tmp_path):
    f = _write(tmp_path / "mix.jsonl", [
        {"question_id": 1, "category": "math", "turns": ["first turn", "second turn"]},
        {"question": "2+2?", "answer": "4\n#### 4"},
        {"instruction": "Summarize", "context": "Some text.", "response": "Short.", "category": "summarization"},
        {"instruction": "Say hi", "context": "", "response": "hi", "category": "open_qa"},
        {"prompt": "plain prompt"},
    ])
    ps = read_prompts(f)
    assert [p.category for p in ps] == ["math", "gsm8k", "summarization", "open_qa", "default"]
    assert ps[0].text == "first turn"
    assert ps[1].reference.endswith("#### 4")
    assert ps[2].text == "Summarize\n\nSome text." and ps[2].reference == "Short."
    assert ps[3].text == "Say hi"


@pytest.mark.parametrize("bad,where", [
    ('{"prompt": "ok"}\n{not json}\n', ":2:"),
    ('{"prompt": "ok"}\n{"foo": 1}\n', ":2:"),
    ('[1, 2]\n', ":1:"),
    ('{"prompt": "   "}\n', ":1:"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, where):
    f = tmp_path / "bad.jsonl"
    f.write_text(bad)
    with pytest.raises(UserError, match=f"bad.jsonl{where}"):
        read_prompts(f)


def test_empty_and_missing(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no records"):
        read_prompts(tmp_path / "e.jsonl")
    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "nope.jsonl")


def test_spec_bench_selection_round_robin():
    ps = load_prompts(None, limit=13)
    assert len({p.category for p in ps}) == 13
    assert default_prompts_file().name == "spec_bench_questions.jsonl"
    assert len(load_prompts(None)) == 480
    qa = load_prompts(None, categories=["qa", "math"], limit=4)
    assert sorted(p.category for p in qa) == ["math", "math", "qa", "qa"]
    with pytest.raises(UserError, match="unknown nope"):
        select(ps, ["nope"])


def test_encode_prompt_without_template(tok300):
    assert encode_prompt(tok300, "the fox") == tok300("the fox")["input_ids"]


def test_seed_mix_parses_limits_and_magpie(tmp_path):
    from sd2.data import limit_applies, load_seed_mix, mix_digest, parse_seed_mix

    a = tmp_path / "a.jsonl"
    a.write_text("".join(f'{{"prompt": "a{i}"}}\n' for i in range(5)))
    b = tmp_path / "b.jsonl"
    b.write_text("".join(f'{{"prompt": "b{i}"}}\n' for i in range(5)))
    assert parse_seed_mix(f"{a}:2+{b}+magpie:7") == [(str(a), 2), (str(b), None), ("magpie", 7)]
    prompts, n_magpie = load_seed_mix(f"{a}:2+{b}:3+magpie:7")
    assert [p.text for p in prompts] == ["a0", "a1", "b0", "b1", "b2"] and n_magpie == 7
    assert len({p.id for p in prompts}) == 5  # ids stay unique across sources
    assert mix_digest(str(a)) != mix_digest(f"{a}:2+{b}:3")
    single, n = load_seed_mix(str(a), limit=3)
    assert [p.id for p in single] == ["0", "1", "2"] and n == 0  # one file: ids as before
    # --limit caps the sources that name none; a mix whose every source names its own ignores it
    assert limit_applies(str(a)) and limit_applies(f"{a}:2+{b}") and not limit_applies(f"{a}:2+{b}:3+magpie:7")
    assert [p.text for p in load_seed_mix(f"{a}:2+{b}", limit=1)[0]] == ["a0", "a1", "b0"]
    from sd2.config import PipelineConfig  # ... and stays out of the pipeline's distillation settings (cache key)

    assert PipelineConfig(seed_prompts=f"{a}:2+{b}:3").resolved().distill_settings().limit is None
    assert PipelineConfig(seed_prompts=str(a)).resolved().distill_settings().limit == 160  # the quick profile's


@pytest.mark.parametrize("spec, needle", [("magpie", "how many"), ("a.jsonl:0", "limit"), ("+x.jsonl", "empty")])
def test_seed_mix_bad_input(spec, needle):
    from sd2.data import parse_seed_mix
    from sd2.errors import UserError

    with pytest.raises(UserError, match=needle):
        parse_seed_mix(spec)
