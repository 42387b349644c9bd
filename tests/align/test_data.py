"""UltraMedical loaders (valid and broken records, JSON / JSONL / Parquet) and chat tokenisation
with labels on assistant tokens only (a tiny word-level tokenizer and the bundled SmolLM2 one)."""

import copy
import json
import os

import pytest

from lmfuse.align.data import (PreferenceRecord, RecordError, load_ultramedical, load_ultramedical_preference,
                               parse_difficulty, preference_features, read_records, tokenize_chat)

from .test_medeval import tiny_tokenizer

SFT = [
    {"id": "MedQA,1592", "type": "Exam",
     "conversations": [{"from": "human", "value": "Which organ makes insulin?\n\nA. liver\nB. pancreas"},
                       {"from": "gpt", "value": "Beta cells.\n\nSo, the answer is B."}],
     "answer": "B", "score": "This question would be rated as a 7. It requires ..."},
    {"id": "ChatDoctor,12", "type": "Open-End",
     "conversations": [{"from": "human", "value": "I have a fever."}, {"from": "gpt", "value": "Drink water."}],
     "answer": None, "score": "Score: 3"},
]
PREF = [
    {"prompt_id": "MedQA,1", "prompt": "what drug treats pain ?",
     "chosen": [{"role": "user", "content": "what drug treats pain ?"}, {"role": "assistant", "content": "aspirin"}],
     "rejected": [{"role": "user", "content": "what drug treats pain ?"}, {"role": "assistant", "content": "salt"}],
     "label_type": "Easy", "metadata": {"chosen": {"model": "m1"}, "rejected": {"model": "m2"}}},
]


def _write(tmp_path, rows, kind):
    path = tmp_path / f"d.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd = pytest.importorskip("pandas")
        pytest.importorskip("pyarrow")
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet"])
def test_load_sft_records(tmp_path, kind):
    recs = load_ultramedical(_write(tmp_path, SFT, kind))
    assert [r.id for r in recs] == ["MedQA,1592", "ChatDoctor,12"]
    r = recs[0]
    assert r.messages == [{"role": "user", "content": SFT[0]["conversations"][0]["value"]},
                          {"role": "assistant", "content": SFT[0]["conversations"][1]["value"]}]
    assert (r.source, r.answer, r.difficulty, recs[1].difficulty, recs[1].answer) == ("MedQA", "B", 7, 3, None)
    assert [x.id for x in load_ultramedical(_write(tmp_path, SFT, kind), types=["Exam"])] == ["MedQA,1592"]
    assert [x.id for x in load_ultramedical(_write(tmp_path, SFT, kind), sources=["ChatDoctor"])] == ["ChatDoctor,12"]


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet"])
def test_load_preference_records(tmp_path, kind):
    (r,) = load_ultramedical_preference(_write(tmp_path, PREF, kind))
    assert (r.prompt_id, r.label_type, r.metadata["chosen"]["model"]) == ("MedQA,1", "Easy", "m1")
    assert r.to_trl() == {"prompt": [PREF[0]["chosen"][0]], "chosen": [PREF[0]["chosen"][1]],
                          "rejected": [PREF[0]["rejected"][1]]}


def _broken_sft(mutate):
    rows = copy.deepcopy(SFT)
    mutate(rows[1])
    return rows


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.pop("id"), "'id'"),
    (lambda r: r.update(type="Quiz"), "'type'"),
    (lambda r: r.pop("conversations"), "'conversations'"),
    (lambda r: r.update(conversations=[]), "'conversations'"),
    (lambda r: r["conversations"][0].update({"from": "robot"}), r"'conversations'\[0\]\.from"),
    (lambda r: r["conversations"][1].update(value=3), r"'conversations'\[1\]\.value"),
    (lambda r: r["conversations"].pop(), "last turn"),
    (lambda r: r.update(answer=2), "'answer'"),
    (lambda r: r.update(id="MedQA,1592"), "duplicate id"),
])
def test_broken_sft_records_name_record_and_field(tmp_path, mutate, field):
    with pytest.raises(RecordError, match=rf"record 1\b.*{field}"):
        load_ultramedical(_write(tmp_path, _broken_sft(mutate), "json"))


@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.pop("prompt"), "'prompt'"),
    (lambda r: r.update(prompt="another question"), "'prompt'"),
    (lambda r: r.update(rejected=r["chosen"]), "identical"),
    (lambda r: r["rejected"][0].update(content="other"), "turns before the answer differ"),
    (lambda r: r["chosen"][1].update(role="tool"), r"'chosen'\[1\]\.role"),
    (lambda r: r.update(prompt_id=5), "'prompt_id'"),
])
def test_broken_preference_records_name_record_and_field(tmp_path, mutate, field):
    rows = [copy.deepcopy(PREF[0]), copy.deepcopy(PREF[0])]
    rows[0]["prompt_id"] = "ok"
    mutate(rows[1])
    with pytest.raises(RecordError, match=rf"record 1\b.*{field}"):
        load_ultramedical_preference(_write(tmp_path, rows, "json"))


def test_read_records_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.json")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="json, .jsonl or .parquet"):
        read_records(tmp_path / "x.csv")
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        read_records(tmp_path / "x.jsonl")
    (tmp_path / "y.json").write_text('[{"a": 1}, 3]')
    with pytest.raises(RecordError, match="record 1"):
        read_records(tmp_path / "y.json")


def test_parse_difficulty():
    assert parse_difficulty("This question would be rated as a 10. Hard.") == 10
    assert parse_difficulty("Score: 4") == 4
    assert parse_difficulty("no number here") is None and parse_difficulty(None) is None


def _assistant_spans_by_hand(tok, messages):
    """Expected labels from the tiny template's grammar: each assistant turn renders as
    '<assistant> {content} </turn>'; the label covers '{content} </turn>'."""
    labels = []
    for m in messages:
        words = [f"<{m['role']}>"] + m["content"].split() + ["</turn>"]
        ids = tok.convert_tokens_to_ids(words)
        labels += [-100] + ids[1:] if m["role"] == "assistant" else [-100] * len(ids)
    return labels


def test_tokenize_chat_labels_only_assistant_tokens_tiny():
    tok = tiny_tokenizer()
    msgs = [{"role": "system", "content": "it help"}, {"role": "user", "content": "what drug treats pain ?"},
            {"role": "assistant", "content": "aspirin"}, {"role": "user", "content": "does it help ?"},
            {"role": "assistant", "content": "yes it does ."}]
    ex = tokenize_chat(msgs, tok)
    assert ex["labels"] == _assistant_spans_by_hand(tok, msgs)
    assert len(ex["input_ids"]) == len(ex["attention_mask"]) == len(ex["labels"])
    assert tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]) == \
        "aspirin </turn> yes it does . </turn>"
    short = tokenize_chat(msgs, tok, max_length=7)
    assert short["input_ids"] == ex["input_ids"][:7] and short["labels"] == ex["labels"][:7]
    with pytest.raises(ValueError, match="max_length"):
        tokenize_chat(msgs, tok, max_length=0)


def test_preference_features_render_both_conversations():
    tok = tiny_tokenizer()
    rec = PreferenceRecord(None, PREF[0]["prompt"], PREF[0]["chosen"], PREF[0]["rejected"])
    f = preference_features(rec, tok)
    assert tok.decode(f["chosen_input_ids"]).endswith("<assistant> aspirin </turn>")
    assert tok.decode(f["rejected_input_ids"]).endswith("<assistant> salt </turn>")
    assert f["chosen_input_ids"][:-2] == f["rejected_input_ids"][:-2]
    g = preference_features(rec, tok, max_length=3)
    assert g["chosen_input_ids"] == f["chosen_input_ids"][-3:]


@pytest.fixture(scope="module")
def smol_tokenizer():
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from lmfuse.models import bundled_gguf_path
    try:
        path = bundled_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_tokenize_chat_on_the_bundled_smollm2_tokenizer(smol_tokenizer):
    tok = smol_tokenizer
    recs = SFT[0]
    msgs = [{"role": "user", "content": recs["conversations"][0]["value"]},
            {"role": "assistant", "content": recs["conversations"][1]["value"]}]
    ex = tokenize_chat(msgs, tok)
    text = tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100])
    # SmolLM2's template: "<|im_start|>assistant\n{content}<|im_end|>\n"; the label covers the
    # content and the end-of-turn tokens, not the role header, the system or the user turn
    assert text.startswith(msgs[1]["content"]) and "<|im_end|>" in text
    assert "assistant" not in text and "insulin" not in text
    first = ex["labels"].index(next(l for l in ex["labels"] if l != -100))
    assert tok.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")
