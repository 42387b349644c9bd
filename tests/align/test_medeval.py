"""Multiple-choice evaluation: the answer-extraction table, the item adapters and loaders, and both
modes on a planted bigram Llama whose answer preference is known in closed form."""

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmfuse.align import medeval
from lmfuse.align.data import RecordError
from lmfuse.align.medeval import MCQItem, evaluate_mcq, extract_choice, majority_vote

PUBMEDQA = Path(os.environ.get("LMFUSE_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")) / "pubmedqa"

WORDS = ["[PAD]", "[UNK]", "</turn>", "<user>", "<assistant>", "<system>", "The", "answer", "is", ".",
         "A", "B", "C", "D", "A.", "B.", "C.", "D.", "yes", "no", "maybe", "Context:", "what", "drug", "treats",
         "fever", "pain", "which", "organ", "makes", "insulin", "liver", "pancreas", "heart", "lung", "aspirin",
         "morphine", "water", "salt", "does", "it", "help", "?"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </turn> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def tiny_tokenizer():
    """A word-level tokenizer (split on whitespace) with a chat template; ``</turn>`` ends a turn."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</turn>")
    t.chat_template = CHAT_TEMPLATE
    return t


def planted_model(is_column: dict[str, float]):
    """A Llama that is a bigram table: embeddings are one-hot, the decoder layer adds nothing
    (zero output projections), the final norm maps the one-hot back to itself, so the logits of
    the next token are ``lm_head.weight[:, current token]``. It answers "answer is <letter> ."
    after the assistant header, the letter drawn from ``is_column`` (letter → logit; every other
    token -30 there). Returns (model, logits table [V, V] float64 with table[next, current])."""
    V = len(WORDS)
    H = V + V % 2  # RoPE needs an even head size
    ids = {w: i for i, w in enumerate(WORDS)}
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=H, max_position_embeddings=256, rms_norm_eps=1e-12,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=ids["</turn>"], bos_token_id=None)
    m = LlamaForCausalLM(cfg).eval()
    table = torch.full((V, V), -30.0, dtype=torch.float64)
    table[ids["answer"], ids["<assistant>"]] = 0.0
    table[ids["is"], ids["answer"]] = 0.0
    table[ids["answer"], ids["The"]] = 0.0
    for letter, logit in is_column.items():
        table[ids[letter], ids["is"]] = logit
    for letter in "ABCD":
        table[ids["."], ids[letter]] = 0.0
    table[ids["</turn>"], ids["."]] = 0.0
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.eye(V, H))
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.model.norm.weight.fill_(1.0 / math.sqrt(H))
        m.lm_head.weight.zero_()
        m.lm_head.weight[:, :V] = table.float()
    m.generation_config.eos_token_id = ids["</turn>"]
    m.generation_config.pad_token_id = 0
    return m, table


def items_with_answers(answers: str, subset="S") -> list[MCQItem]:
    return [MCQItem(f"q{i}", "which drug treats pain ?", {"A": "aspirin", "B": "water", "C": "salt", "D": "morphine"},
                    a, subset) for i, a in enumerate(answers)]


# ------------------------------------------------------------------------------ extraction table

EXTRACTION_TABLE = [
    # (generated text, options, expected letter or None)
    ("So, the answer is C.", "ABCD", "C"),
    ("The answer is (B)", "ABCD", "B"),
    ("The answer is: **D**", "ABCD", "D"),
    ("I first thought the answer is A, but on reflection the answer is B.", "ABCD", "B"),  # last match wins
    ("Answer: C", "ABCD", "C"),
    ("answer : option D", "ABCD", "D"),
    ("Option B is correct because ...", "ABCD", "B"),
    ("B. Pancreas", "ABCD", "B"),
    ("(A) aspirin", "ABCD", "A"),
    ("D", "ABCD", "D"),
    ("C) the liver", "ABCD", "C"),
    ("the answer is a drug", "ABCD", None),          # lower-case 'a' is a word, not option A
    ("the answer is E.", "ABCD", None),              # a letter outside the options is ignored
    ("A. yes\nB. no\nC. maybe", "ABC", "A"),         # only the very start counts as a leading letter
    ("Insulin is made there. A good question.", "ABCD", None),
    ("", "ABCD", None),
    ("Yes, the study shows it.", {"A": "yes", "B": "no", "C": "maybe"}, "A"),
    ("maybe; the data are mixed", {"A": "yes", "B": "no", "C": "maybe"}, "C"),
    ("It is made by the pancreas.", {"A": "liver", "B": "pancreas", "C": "heart"}, "B"),   # one option named
    ("Not the liver but the pancreas.", {"A": "liver", "B": "pancreas", "C": "heart"}, None),  # two named
    ("The answer is B. Yes, definitely.", {"A": "yes", "B": "no", "C": "maybe"}, "B"),  # rules before texts
]


@pytest.mark.parametrize("text,options,expected", EXTRACTION_TABLE)
def test_extraction_table(text, options, expected):
    assert extract_choice(text, options) == expected


def test_extract_rejects_non_text():
    with pytest.raises(TypeError, match="text"):
        extract_choice(None)


def test_majority_vote():
    assert majority_vote(["B", "C", "B", None], "ABCD") == "B"
    assert majority_vote(["C", "B", "B", "C"], "ABCD") == "B"      # tie: the earliest letter
    assert majority_vote([None, None], "ABC") is None
    assert majority_vote(["E", "A"], "ABCD") == "A"                  # an out-of-range vote does not count


# ------------------------------------------------------------------------------ adapters and loaders


def test_adapters_map_every_format():
    q = medeval.from_medqa({"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "C"})
    assert (q.answer, q.options["C"], q.subset) == ("C", "c", "MedQA")
    q = medeval.from_medqa({"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 3})
    assert (q.answer, q.options["D"]) == ("D", "d")
    q = medeval.from_medmcqa({"id": "x", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1})
    assert (q.id, q.answer, q.options["B"]) == ("x", "B", "b")
    q = medeval.from_pubmedqa({"pubid": 7, "question": "Q?", "context": {"contexts": ["c1", "c2"]},
                               "final_decision": "maybe"})
    assert (q.id, q.answer, q.context, q.options) == ("7", "C", ["c1", "c2"], {"A": "yes", "B": "no", "C": "maybe"})
    q = medeval.from_mmlu({"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 0, "subject": "anatomy"})
    assert (q.answer, q.subset) == ("A", "anatomy")


def test_format_question_matches_the_ultramedical_layout():
    q = medeval.from_pubmedqa({"QUESTION": "Does it help?", "CONTEXTS": ["c1", "c2"], "final_decision": "yes"})
    assert medeval.format_question(q) == "Context: c1\nContext: c2\nDoes it help?\n\nA. yes\nB. no\nC. maybe"


@pytest.mark.parametrize("row,field", [
    ({"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}, "cop"),
    ({"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "cop": 0}, "opd"),
])
def test_bad_medmcqa_records_name_the_field(row, field, tmp_path):
    path = tmp_path / "m.jsonl"
    good = {"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=rf"record 1.*{field}"):
        medeval.load_mcq(path, "medmcqa")


def test_load_mcq_limit_with_seed_is_a_reproducible_sample(tmp_path):
    rows = [{"question": f"Q{i}?", "choices": ["a", "b"], "answer": i % 2, "subject": "s"} for i in range(20)]
    path = tmp_path / "mmlu.json"
    path.write_text(json.dumps(rows))
    a = medeval.load_mcq(path, "mmlu", limit=5, seed=3)
    b = medeval.load_mcq(path, "mmlu", limit=5, seed=3)
    assert [x.question for x in a] == [x.question for x in b] and len(a) == 5
    assert [x.question for x in medeval.load_mcq(path, "mmlu", limit=5)] == [f"Q{i}?" for i in range(5)]
    with pytest.raises(ValueError, match="format"):
        medeval.load_mcq(path, "usmle")


@pytest.mark.skipif(not (PUBMEDQA / "ori_pqal.json").exists(), reason="PubMedQA data folder absent")
def test_pubmedqa_loader_on_the_real_files():
    test = medeval.load_pubmedqa(PUBMEDQA, split="test")
    train = medeval.load_pubmedqa(PUBMEDQA, split="train")
    truth = json.loads((PUBMEDQA / "test_ground_truth.json").read_text())
    assert len(test) == 500 and len(train) == 500
    assert {it.id for it in test} == set(truth) and not ({it.id for it in train} & set(truth))
    letter = {"yes": "A", "no": "B", "maybe": "C"}
    assert all(it.answer == letter[truth[it.id]] for it in test)
    assert all(it.context and it.options == {"A": "yes", "B": "no", "C": "maybe"} for it in test)
    counts = Counter(it.answer for it in test + train)
    assert (counts["A"], counts["B"], counts["C"]) == (552, 338, 110)   # the README's label counts


# ------------------------------------------------------------------------------ the two modes


def _log_softmax_column(table, word):
    col = table[:, WORDS.index(word)]
    return col - torch.logsumexp(col, 0)


def test_loglik_mode_scores_equal_the_planted_closed_form():
    tok = tiny_tokenizer()
    model, table = planted_model({"A": -1.0, "B": 2.0, "C": 0.5, "D": 0.0})
    answers = "".join("ABCD"[i] for i in torch.randint(0, 4, (12,)).tolist())
    items = items_with_answers(answers, "S1")[:7] + items_with_answers(answers, "S2")[7:]
    rep = evaluate_mcq(model, tok, items, mode="loglik", batch_size=5, progress=False)
    ref = _log_softmax_column(table, "is")
    for p in rep.predictions:
        assert p["prediction"] == "B"
        for L, s in p["scores"].items():
            assert s == pytest.approx(float(ref[WORDS.index(L)]), abs=1e-4)
    acc1 = answers[:7].count("B") / 7
    acc2 = answers[7:].count("B") / 5
    assert rep.accuracy == pytest.approx({"S1": acc1, "S2": acc2})
    assert rep.average == pytest.approx((acc1 + acc2) / 2)                 # unweighted over subsets
    assert rep.invalid_rate == 0 and rep.counts == {"S1": 7, "S2": 5}


def test_loglik_multi_token_continuations_use_the_sequence_path():
    model, table = planted_model({"A": 0.0, "B": 1.5})
    w = {x: WORDS.index(x) for x in WORDS}
    # make every scored step uncertain, so dropping or shifting a continuation token shows
    for nxt, cur, logit in (("heart", "answer", 0.7), ("what", "<assistant>", -0.4)):
        table[w[nxt], w[cur]] = logit
        with torch.no_grad():
            model.lm_head.weight[w[nxt], w[cur]] = logit
    ctx = [w["<user>"], w["what"], w["</turn>"], w["<assistant>"], w["answer"]]
    batch = [[(ctx, [w["is"], w["A"]]), (ctx, [w["is"], w["B"]])], [(ctx[:-1], [w["answer"]]), (ctx, [w["is"]])]]
    got = medeval._loglik_scores(model, batch, pad=0)
    lp = lambda nxt, cur: float(_log_softmax_column(table, cur)[w[nxt]])  # noqa: E731
    want = [[lp("is", "answer") + lp("A", "is"), lp("is", "answer") + lp("B", "is")],
            [lp("answer", "<assistant>"), lp("is", "answer")]]
    assert [len(g) for g in got] == [2, 2]
    assert sum(got, []) == pytest.approx(sum(want, []), abs=1e-4)


def test_generate_greedy_reads_the_planted_answer(tmp_path):
    tok = tiny_tokenizer()
    model, _ = planted_model({"A": 0.0, "B": 0.0, "C": 3.0})
    answers = "".join("ABCD"[i] for i in torch.randint(0, 4, (6,)).tolist())
    out = tmp_path / "preds.json"
    rep = evaluate_mcq(model, tok, items_with_answers(answers), mode="generate", max_new_tokens=8, batch_size=4,
                       progress=False, predictions_path=out)
    assert all(p["outputs"] == ["answer is C ."] and p["prediction"] == "C" for p in rep.predictions)
    assert rep.accuracy["S"] == pytest.approx(answers.count("C") / 6)
    saved = json.loads(out.read_text())
    assert saved["mode"] == "generate" and [p["id"] for p in saved["predictions"]] == [f"q{i}" for i in range(6)]


def test_generate_counts_an_answer_without_a_letter_as_invalid():
    tok = tiny_tokenizer()
    model, table = planted_model({"C": 3.0})
    with torch.no_grad():   # after "is" the model now says "maybe": no letter, no option text of these items
        model.lm_head.weight[WORDS.index("maybe"), WORDS.index("is")] = 10.0
    rep = evaluate_mcq(model, tok, items_with_answers("AB"), mode="generate", max_new_tokens=4, progress=False)
    assert rep.invalid_rate == 1.0 and rep.accuracy["S"] == 0.0
    assert all(p["prediction"] is None and not p["correct"] for p in rep.predictions)


def test_self_consistency_votes_and_top_p():
    """P(B) = σ(1/0.7) ≈ 0.806 after "is" at T = 0.7: top-p 0.9 keeps C, so the 160 samples hold
    some C (P(none) = 0.806^160 < 1e-14) and the B share lies within 5σ of 0.806; each item's
    prediction is the majority of its own votes. With B's logit at 2 (P(B) ≈ 0.946 ≥ 0.9) top-p
    keeps B alone: every vote is B."""
    tok = tiny_tokenizer()
    answers = "".join("ABCD"[i] for i in torch.randint(0, 4, (16,)).tolist())
    items = items_with_answers(answers)
    model, _ = planted_model({"B": 1.0, "C": 0.0})
    rep = evaluate_mcq(model, tok, items, mode="generate", decoding="self_consistency", max_new_tokens=6,
                       batch_size=40, seed=int(torch.randint(0, 2**31, ())), progress=False)
    votes = [v for p in rep.predictions for v in p["votes"]]
    assert len(votes) == 160 and set(votes) == {"B", "C"}
    p_b = 1 / (1 + math.exp(-1 / 0.7))
    assert abs(votes.count("B") / 160 - p_b) < 5 * math.sqrt(p_b * (1 - p_b) / 160)
    for p, it in zip(rep.predictions, items):
        c = Counter(p["votes"])
        expected = "B" if c["B"] >= c["C"] else "C"
        assert p["prediction"] == expected and p["correct"] == (expected == it.answer)
    sharp, _ = planted_model({"B": 2.0, "C": 0.0})
    rep = evaluate_mcq(sharp, tok, items[:4], mode="generate", decoding="self_consistency", max_new_tokens=6,
                       batch_size=40, progress=False)
    assert all(p["votes"] == ["B"] * 10 for p in rep.predictions)


@pytest.mark.parametrize("kw,match", [
    ({"mode": "mc"}, "mode"), ({"decoding": "beam"}, "decoding"), ({"batch_size": 0}, "batch_size"),
    ({"top_p": 1.5}, "top_p"), ({"temperature": 0}, "temperature"), ({"n_samples": 0}, "n_samples"),
])
def test_bad_arguments_name_the_argument(kw, match):
    model, _ = planted_model({"B": 1.0})
    with pytest.raises(ValueError, match=match):
        evaluate_mcq(model, tiny_tokenizer(), items_with_answers("A"), progress=False, **kw)
    with pytest.raises(TypeError, match="items"):
        evaluate_mcq(model, tiny_tokenizer(), [], progress=False)
