"""Real human narrations (Video Localized Narratives) through the image-LN layout and both alignments."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixelllm.data.ln import LocalizedNarrativesReader, align_official, align_time_window
from pixelllm.data.vidln import VidlnReader, vidln_to_ln
from pixelllm.data.words import caption_words, word_at
from pixelllm.tokenization import encode_target, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vidln_files(real_data):
    return sorted((real_data / "vidln").glob("*.jsonl"))


@pytest.fixture(scope="module")
def samples(vidln_files):
    reader = VidlnReader(vidln_files)
    result = list(reader)
    assert not reader.report.skipped
    return result


def test_conversion_of_the_first_ovis_narrative(real_data):
    record = json.loads((real_data / "vidln" / "OVIS_train_sample.jsonl").read_text().splitlines()[0])
    first = next(vidln_to_ln(record))
    actor = record["actor_narratives"][0]
    assert first["caption"] == "A group of people is cycling on the grey road."
    assert first["image_id"] == "c1a40349/0"
    # word times are ms after the recording start: "A" 2360-2540 ms
    assert first["timed_caption"][0] == {"utterance": "A", "start_time": 2.36, "end_time": 2.54}
    assert len(first["timed_caption"]) == len(actor["time_alignment"])
    # trace times on the same clock: 1646807048278 - 1646807046669 = 1609 ms
    assert first["traces"][0][0]["t"] == pytest.approx(1.609)
    assert first["traces"][0][0]["x"] == 0.74895
    assert [len(s) for s in first["traces"]] == [len(s) for s in actor["traces"]]


def test_every_actor_narrative_becomes_a_sample(samples, vidln_files):
    expected = sum(
        len(json.loads(line)["actor_narratives"]) for f in vidln_files for line in f.read_text().splitlines()
    )
    assert len(samples) == expected == 22
    for s in samples:
        n = s.narratives[0]
        assert np.all(np.diff(n.trace[:, 2]) >= 0)
        assert len(n.utterances) == len(n.caption.split())  # VidLN aligns every word


def test_round_trip_through_the_image_ln_layout(vidln_files, samples, tmp_path):
    path = tmp_path / "converted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in VidlnReader(vidln_files).records()))
    read = list(LocalizedNarrativesReader(path))
    assert len(read) == len(samples)
    for a, b in zip(read, samples, strict=True):
        assert a.image_id == b.image_id
        np.testing.assert_array_equal(a.narratives[0].trace, b.narratives[0].trace)


def test_python_literal_fields_are_parsed_safely(real_data):
    record = json.loads((real_data / "vidln" / "oops_train_sample.jsonl").read_text().splitlines()[0])
    plain = list(vidln_to_ln(record))
    stringly = json.loads(json.dumps(record))
    for actor in stringly["actor_narratives"]:
        actor["traces"] = repr(actor["traces"])
        actor["time_alignment"] = repr(actor["time_alignment"])
    assert list(vidln_to_ln(stringly)) == plain
    stringly["actor_narratives"] = repr(stringly["actor_narratives"])
    assert list(vidln_to_ln(stringly)) == plain


def test_code_in_a_literal_field_is_not_run(tmp_path):
    bad = {
        "video_id": "v",
        "actor_narratives": [
            {
                "caption": "a b",
                "recording_start_time_ms_since_epoch": 0,
                "time_alignment": "[__import__('os').getcwd()]",
                "traces": "[]",
            }
        ],
    }
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(bad) + "\n")
    reader = VidlnReader(path)
    assert list(reader) == []
    assert dict(reader.report.skipped) == {"unparseable literal field": 1}


def test_both_alignments_on_every_real_narrative(samples):
    tokenizer = train_tokenizer([s.narratives[0].caption for s in samples], vocab_size=512)
    for s in samples:
        n = s.narratives[0]
        t = encode_target(tokenizer, n.caption, 128)
        official, timed = align_official(n, t), align_time_window(n, t)
        assert official.mask[:-1].all() and not official.mask[-1]  # every text token, never EOS
        # the time-window target exists exactly where the word's window meets the trace's time span
        # (VidLN aligns every word, in order, so word i is utterance i)
        t0, t1 = n.trace[0, 2], n.trace[-1, 2]
        words = caption_words(n.caption)
        for j, (start, end) in enumerate(t.offsets[:-1]):
            u = n.utterances[word_at(words, n.caption, start, end)]
            assert timed.mask[j] == (u.start_time <= t1 and u.end_time >= t0)
        # with one word per utterance, proportional and timed assignments stay close in order
        both = official.mask & timed.mask
        assert np.abs(official.utterance - timed.utterance)[both].mean() < 3
        pixels = official.to_pixels((640, 360))
        assert pixels.min() >= 0 and pixels[:, [0, 2]].max() <= 640 and pixels[:, [1, 3]].max() <= 360


def test_comparison_script_runs_on_every_real_record(vidln_files):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare_ln_alignments.py"), *map(str, vidln_files)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "vidln: kept 22, skipped 0" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| all |")]
    assert len(rows) == 2 and all("| 22 |" in row for row in rows)
