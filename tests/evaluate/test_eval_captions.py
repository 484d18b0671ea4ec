"""Caption metrics and the shared METEOR process (these tests need Java)."""

import math
import shutil
import subprocess

import pytest

import pixelllm.evaluate.captions as captions_module
from pixelllm.evaluate import CaptionMetrics, MeteorScorer
from pixelllm.evaluate.captions import ptb_tokenize

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java")

REFERENCES = [
    ["a man riding a brown horse"],
    ["two dogs playing in the snow"],
    ["a red bus parked near a building"],
]


@pytest.fixture
def count_spawns(monkeypatch):
    """Records every METEOR process started while the test runs."""
    spawned = []
    real_popen = subprocess.Popen

    def counting_popen(command, *args, **kwargs):
        if any("meteor" in str(part) for part in command):
            spawned.append(command)
        return real_popen(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", counting_popen)
    return spawned


def test_identical_captions_give_the_maximum(meteor):
    metric = CaptionMetrics(meteor)
    # Case and punctuation are removed by the PTB tokenizer.
    metric.update(["A man riding a brown horse.", "Two dogs playing in the snow!"], REFERENCES[:2])
    metric.update(["a red bus parked near a building"], REFERENCES[2:])
    result = metric.compute()
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L"):
        assert result[name] == pytest.approx(100.0), name
    # CIDEr-D: every n-gram order's TF-IDF vectors coincide (cosine 1, no length penalty) and some
    # n-gram of each order is unique to its image (non-zero IDF), so each image scores
    # 10 * mean_n(1) = 10, reported x100.
    assert result["CIDEr"] == pytest.approx(1000.0)
    assert result["num_samples"] == 3.0
    assert "SPICE" not in result


def test_different_captions_score_low(meteor):
    metric = CaptionMetrics(meteor)
    metric.update(["purple elephant", "green kite flying", "old clock tower"], REFERENCES)
    result = metric.compute()
    assert result["METEOR"] == 0.0
    assert result["CIDEr"] == 0.0
    assert result["ROUGE-L"] == 0.0


def test_missing_references_are_skipped_and_missing_predictions_are_scored(meteor):
    metric = CaptionMetrics(meteor)
    metric.update(
        ["a man riding a brown horse", "anything", "", None],
        [REFERENCES[0], ["", "   "], REFERENCES[1], REFERENCES[2]],
    )
    result = metric.compute()
    assert result["num_samples"] == 3.0
    assert result["num_skipped"] == 1.0
    assert result["num_invalid_predictions"] == 1.0
    # One perfect caption and two empty ones: ROUGE-L is the mean of 1, 0, 0.
    assert result["ROUGE-L"] == pytest.approx(100 / 3)


def test_nothing_seen_gives_nan():
    assert math.isnan(CaptionMetrics().compute()["CIDEr"])


def test_identical_text_has_meteor_1_and_pairs_share_one_process(meteor, count_spawns):
    pid = meteor.pid
    hypotheses = [f"a photo of object number {i}" for i in range(40)]
    references = [[f"a photo of object number {i}", "something else"] for i in range(40)]
    whole = meteor.corpus_score(hypotheses, references)
    chunk_size, meteor.chunk_size = meteor.chunk_size, 7
    try:
        in_chunks = meteor.pair_scores(hypotheses, references)
    finally:
        meteor.chunk_size = chunk_size
    assert whole[0] == 1.0
    assert whole[1] == in_chunks == [1.0] * 40
    assert meteor.pid == pid
    assert count_spawns == []


def test_metrics_reuse_a_given_scorer(meteor, count_spawns):
    metric = CaptionMetrics(meteor)
    metric.update(["a dog"], [["a dog"]])
    metric.compute()
    metric.compute()
    assert count_spawns == []
    assert not meteor.closed


def test_close_ends_the_process(count_spawns):
    scorer = MeteorScorer()
    assert len(count_spawns) == 1
    with scorer:
        assert not scorer.closed
    assert scorer.closed
    scorer.close()


def test_a_metric_without_a_scorer_starts_and_closes_its_own(meteor, monkeypatch):
    events = []

    class RecordingScorer:
        """Stands in for a fresh ``MeteorScorer`` (no second Java start-up), scoring with the shared one."""

        def __init__(self):
            events.append("started")

        def corpus_score(self, hypotheses, references):
            return meteor.corpus_score(hypotheses, references)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            events.append("closed")

    monkeypatch.setattr(captions_module, "MeteorScorer", RecordingScorer)
    metric = CaptionMetrics()
    metric.update(["a dog"], [["a dog"]])
    assert metric.compute()["METEOR"] == 100.0
    assert events == ["started", "closed"]


def test_ptb_tokenize_lowercases_and_drops_punctuation():
    assert ptb_tokenize([["A Man, riding!"], [], ["Hello\nworld", ""]]) == [
        ["a man riding"],
        [],
        ["hello world", ""],
    ]


def test_ptb_tokenize_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    groups = [["A red Circle, left of the \"blue\" square.", "Two (small) stars!"], ["it's -- well... 3.5 px"]]
    official = PTBTokenizer().tokenize({i: [{"caption": text} for text in group] for i, group in enumerate(groups)})
    assert ptb_tokenize(groups) == [official[0], official[1]]


def test_ptb_tokenize_writes_nothing_to_the_terminal(capfd):
    """pycocoevalcap's Java tokenizer prints a line of statistics on stderr at every call."""
    ptb_tokenize([["A man riding a horse."]])
    assert capfd.readouterr() == ("", "")


def test_a_tokenizer_that_fails_is_one_error(monkeypatch):
    from pycocoevalcap.tokenizer import ptbtokenizer

    from pixelllm.errors import PixelLLMError

    monkeypatch.setattr(ptbtokenizer, "STANFORD_CORENLP_3_4_1_JAR", "missing.jar")
    with pytest.raises(PixelLLMError, match=r"the PTB tokenizer \(Java\) failed with status 1: .*PTBTokenizer"):
        ptb_tokenize([["a man"]])
