"""Caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (SPICE left out).

METEOR (METEOR 1.5) and the PTB tokenizer (Stanford CoreNLP 3.4.1) are Java programs shipped inside
pycocoevalcap; they need ``java`` on the PATH. ``MeteorScorer`` keeps **one** METEOR process for a
whole evaluation (its start-up, loading the English paraphrase table, takes seconds): pass one
scorer to every metric that needs METEOR (``CaptionMetrics``, ``DenseCaptioning``) and close it at
the end, best with ``with MeteorScorer() as meteor: ...``.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from pixelllm.errors import PixelLLMError
from pixelllm.evaluate.base import Metric, check_same_length

logger = logging.getLogger(__name__)

CAPTION_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def _require_java() -> None:
    if shutil.which("java") is None:
        raise PixelLLMError("METEOR and the PTB tokenizer need Java: no `java` found on the PATH")


def one_line(text: str) -> str:
    """``text`` as one line for the Java tools: whitespace runs become one space, and METEOR's field
    separator ``|||`` is removed (as pycocoevalcap does for hypotheses)."""
    return " ".join(text.replace("|||", "").split())


class MeteorScorer:
    """One persistent METEOR 1.5 process (pycocoevalcap's ``Meteor``: ``-l en -norm``).

    Every call sends its pairs through the same process, under pycocoevalcap's lock, so one scorer
    may serve several metrics and threads. Use it as a context manager, or call ``close()``.
    """

    def __init__(self, chunk_size: int = 5000) -> None:
        """``chunk_size``: pairs per request in ``pair_scores`` (keeps each request line bounded)."""
        _require_java()
        self.chunk_size = chunk_size
        self._meteor = Meteor()

    @property
    def pid(self) -> int:
        """Process id of the METEOR Java process."""
        return self._meteor.meteor_p.pid

    @property
    def closed(self) -> bool:
        """Whether the METEOR process has ended."""
        return self._meteor.meteor_p.poll() is not None

    def corpus_score(
        self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[float, list[float]]:
        """The corpus METEOR (from the pooled statistics, as coco-caption reports it) and each
        pair's METEOR, in [0, 1], from one request.

        ``hypotheses[i]`` is scored against the non-empty list ``references[i]`` (best reference).
        """
        check_same_length(hypotheses=hypotheses, references=references)
        if not hypotheses:
            return math.nan, []
        if not all(references):
            raise ValueError("every hypothesis needs at least one reference")
        if self.closed:
            raise PixelLLMError("the METEOR process has ended (closed, or Java failed)")
        candidates = {i: [one_line(text)] for i, text in enumerate(hypotheses)}
        refs = {i: [one_line(text) for text in group] for i, group in enumerate(references)}
        score, scores = self._meteor.compute_score(refs, candidates)
        return score, scores

    def pair_scores(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """Each pair's METEOR in [0, 1], sent in requests of ``chunk_size`` pairs."""
        scores: list[float] = []
        for start in range(0, len(hypotheses), self.chunk_size):
            stop = start + self.chunk_size
            scores += self.corpus_score(hypotheses[start:stop], references[start:stop])[1]
        return scores

    def close(self) -> None:
        """End the METEOR process (idempotent)."""
        process = self._meteor.meteor_p
        with self._meteor.lock:
            if process.poll() is None:
                process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                stream.close()

    def __enter__(self) -> MeteorScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


PTB_TOKENIZER = "edu.stanford.nlp.process.PTBTokenizer"


def ptb_tokenize(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """PTB-tokenize groups of sentences with one Java run: lower-cased, punctuation tokens removed,
    tokens joined by single spaces. Returns the groups in order, each sentence tokenized.

    pycocoevalcap's ``PTBTokenizer`` with its command, jar and punctuation list, run here so that
    the sentences go through stdin (it writes a temporary file into its installed package) and the
    line of statistics that the tokenizer prints on stderr at every call stays out of the terminal;
    a failure is a ``PixelLLMError`` with Java's last line.
    """
    _require_java()
    sentences = [one_line(text) for group in groups for text in group]
    if not sentences:
        return [[] for _ in groups]
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    run = subprocess.run(["java", "-cp", str(jar), PTB_TOKENIZER, "-preserveLines", "-lowerCase"],
                         input="\n".join(sentences).encode(), capture_output=True, check=False)
    if run.returncode:
        last = run.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise PixelLLMError(f"the PTB tokenizer (Java) failed with status {run.returncode}: {last[0]}")
    lines = iter(run.stdout.decode().split("\n"))
    return [[" ".join(w for w in next(lines, "").rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS)
             for _ in group] for group in groups]


class CaptionMetrics(Metric):
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) of one predicted caption per sample against its
    reference captions, computed as coco-caption computes them: PTB tokenization of both sides, then
    pycocoevalcap's scorers over the whole split (corpus BLEU and METEOR, mean ROUGE-L and CIDEr,
    CIDEr's document frequencies from this split's references).

    All values are reported x100 (the papers' scale: METEOR 20.1, CIDEr 149.0). **SPICE is not
    computed**: pycocoevalcap's SPICE downloads Stanford CoreNLP models at run time.

    A sample without a non-empty reference is skipped; a prediction that is not a string is scored
    as the empty caption (``num_invalid_predictions``). An empty predicted caption is a legitimate
    (bad) prediction and is scored as such.
    """

    def __init__(self, meteor: MeteorScorer | None = None) -> None:
        """``meteor``: a shared scorer; without one, ``compute`` starts and closes its own."""
        self.meteor = meteor
        super().__init__()

    def _clear(self) -> None:
        self._predictions: list[str] = []
        self._references: list[list[str]] = []

    def update(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        """Add a batch: ``predictions[i]`` is a caption, ``references[i]`` its reference captions."""
        check_same_length(predictions=predictions, references=references)
        for prediction, refs in zip(predictions, references, strict=True):
            usable = [text for text in refs if isinstance(text, str) and text.strip()]
            if not usable:
                self.counts["num_skipped"] += 1
                continue
            if not isinstance(prediction, str):
                self.counts["num_invalid_predictions"] += 1
                prediction = ""
            self._predictions.append(prediction)
            self._references.append(usable)
            self.counts["num_samples"] += 1

    def _values(self) -> dict[str, float]:
        logger.info("SPICE is not computed (pycocoevalcap's SPICE downloads models at run time)")
        if not self._predictions:
            return dict.fromkeys(CAPTION_KEYS, math.nan)
        num = len(self._predictions)
        tokenized = ptb_tokenize([[text] for text in self._predictions] + self._references)
        hypotheses = [group[0] for group in tokenized[:num]]
        candidates = {i: [text] for i, text in enumerate(hypotheses)}
        refs = dict(enumerate(tokenized[num:]))
        bleu, _ = Bleu(4).compute_score(refs, candidates, verbose=0)
        with ExitStack() as stack:
            meteor = self.meteor or stack.enter_context(MeteorScorer())
            meteor_score, _ = meteor.corpus_score(hypotheses, tokenized[num:])
        scores = {f"BLEU-{n}": value for n, value in enumerate(bleu, start=1)}
        scores["METEOR"] = meteor_score
        scores["ROUGE-L"] = Rouge().compute_score(refs, candidates)[0]
        scores["CIDEr"] = Cider().compute_score(refs, candidates)[0]
        return {name: 100.0 * float(value) for name, value in scores.items()}
