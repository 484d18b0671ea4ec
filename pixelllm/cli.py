"""The ``pixelllm`` command line (INTERFACE.md).

Exit status: 0 on success, 2 with one ``error: `` line on stderr for a problem with what the user
gave (``PixelLLMError``, bad arguments), 1 for a fault of the program itself.

Every command imports what it uses when it runs, so that ``--help``, ``synth`` or a bad argument
never wait for PyTorch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pixelllm.errors import ConfigError, InputError, PixelLLMError

SMALL_MODEL = 50_000_000  # parameters: below this, more than one CPU thread per operation only costs


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise PixelLLMError(f"{message} (see: {self.prog} --help)")


def _predictor(args):
    """The model of ``--model`` (default: the embedded one), on the CPU threads that help it.

    A small model's operations are too short to split: on a quiet 2-core machine the embedded
    model captions as fast on one thread as on two (0.10 s), and on a CPU that other processes
    use, OpenMP threads that wait by spinning steal the cores the work needs (0.9 to 8.7 s for
    the same caption on two threads). ``--threads`` sets the count.
    """
    import torch

    from pixelllm.tasks import load

    predictor = load(args.model)
    threads = getattr(args, "threads", None)
    if threads is None and sum(p.numel() for p in predictor.model.parameters()) < SMALL_MODEL:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    return predictor


def _batch_invariant(run):
    """``run`` under the server's numerics, so that ``--json`` equals what ``pixelllm serve`` answers."""

    def invariant(args):
        from pixelllm.serve.tasks import batch_invariant

        with batch_invariant():
            run(args)

    return invariant


BATCH = 8
"""Images read and answered together: the Predictor's batched methods take them in one pass."""
STDIN = "-"


@dataclass
class _Answer:
    """One image's answer: its JSON, how to draw its picture (only if ``--out``), its mask (``--mask``)."""

    result: dict
    picture: Callable
    mask: object = None


def _run_images(args, answer) -> None:
    """Answer every image of ``args.images``, ``BATCH`` at a time (``answer(args, predictor, images)``
    gives an ``_Answer`` per image); print each result and write the files asked for."""
    from pixelllm.viz import save_mask, save_picture

    outputs = _OutputPaths(args)
    predictor = _predictor(args)
    for start in range(0, len(args.images), BATCH):
        names = args.images[start : start + BATCH]
        images = [_read_image(name) for name in names]
        for name, image, found in zip(names, images, answer(args, predictor, images), strict=True):
            if predictor.embedded:
                _note_outside_world(name, image)
            if args.out:
                _wrote(save_picture(found.picture(), outputs.picture(name)))
            if getattr(args, "mask", None):
                _wrote(save_mask(found.mask, outputs.mask(name)))
            _print(args, name, found.result)


def _print(args, name: str, result: dict) -> None:
    """``result`` as JSON (``--json``; with several images, one line each, naming its image) or as text."""
    several = len(args.images) > 1
    if args.json:
        print(json.dumps({"image": name, **result} if several else result))
    else:
        print(f"{name}:\n{_as_text(result)}" if several else _as_text(result))


def _wrote(path: Path) -> None:
    print(f"wrote {path}", file=sys.stderr)


def _note_outside_world(name: str, image) -> None:
    """One line on stderr when ``image`` does not look like the shapes world."""
    from pixelllm.data.shapes.likeness import looks_like_shapes_world

    if not looks_like_shapes_world(image):
        print(f"note: {_label(name)} does not look like the shapes world, the only thing the embedded model knows "
              "(flat colored shapes on plain backgrounds): its answers on it are not meaningful", file=sys.stderr)


def _read_image(name: str):
    from pixelllm.data.images import load_image

    if name != STDIN:
        return load_image(name)
    data = sys.stdin.buffer.read()
    if not data:
        raise InputError("no image on stdin: pipe one in (pixelllm caption - < photo.jpg)")
    return load_image(data, name="from stdin")


def _label(name: str) -> str:
    return "the image from stdin" if name == STDIN else name


class _OutputPaths:
    """Where ``--out`` (and ``--mask``) write for each image: the path given, for one image (or
    ``<path>/<image name>.png`` if it is a directory); for several, ``<path>`` is a directory
    (made if missing) holding ``<image name>.png`` (masks ``<image name>_mask.png``) of each."""

    def __init__(self, args):
        if args.images.count(STDIN) > 1:
            raise InputError("'-' (stdin) can stand for one image only")
        self.several = len(args.images) > 1
        self.names = _file_names(args.images)
        self.out, self.masks = args.out, getattr(args, "mask", None)
        for option, path in (("--out", self.out), ("--mask", self.masks)):
            if path and self.several:
                _make_directory(option, Path(path))

    def picture(self, name: str) -> Path:
        return self._path(self.out, name, "")

    def mask(self, name: str) -> Path:
        return self._path(self.masks, name, "_mask")

    def _path(self, given: str, name: str, suffix: str) -> Path:
        path = Path(given)
        return path / f"{self.names[name]}{suffix}.png" if self.several or path.is_dir() else path


def _file_names(images: list[str]) -> dict[str, str]:
    """A distinct file name (no extension) for the picture of each image: its own name, numbered
    when two share one (``a/x.png`` and ``b/x.png`` give ``x`` and ``x-2``)."""
    names: dict[str, str] = {}
    for image in dict.fromkeys(images):
        stem = "stdin" if image == STDIN else Path(image).stem
        name, count = stem, 1
        while name in names.values():
            count += 1
            name = f"{stem}-{count}"
        names[image] = name
    return names


def _make_directory(option: str, path: Path) -> None:
    if path.suffix.lower() == ".png" and not path.is_dir():
        raise InputError(f"{option} {path}: with several images, give a directory (each image gets <name>.png)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{option}: cannot create directory {path}: {error.strerror or error}") from None


def _as_text(result: dict) -> str:
    if "caption" in result and "words" in result:
        words = " ".join(f"{w['text']}@({w['point'][0]:.0f},{w['point'][1]:.0f})" for w in result["words"])
        return f"{result['caption']}\n{words}"
    if "regions" in result:
        return "\n".join(f"{r['score']:.2f} [{', '.join(f'{v:.0f}' for v in r['box'])}] {r['caption']}"
                         for r in result["regions"]) or "(no regions)"
    if "targets" in result:
        return f"{result['query']}: " + ("; ".join(
            f"[{', '.join(f'{v:.0f}' for v in t['box'])}] score {t['score']:.2f}" for t in result["targets"])
            or "none found")
    box = ", ".join(f"{v:.1f}" for v in result["box"])
    area = f" mask area {result['area']} px" if "area" in result else ""
    found = "" if result["found"] else " (not found: the score is under --min-score; the box is the best guess)"
    return f"{result['expression']}: [{box}] score {result['score']:.3f}{area}{found}"


def _caption(args, predictor, images) -> list[_Answer]:
    """Whole-image captions decode together; a box, point or prompt caption decodes image by image."""
    from pixelllm.viz import draw_caption

    encoded = predictor.encode_batch(images)
    if args.box is None and args.point is None and args.prompt is None:
        captions = predictor.caption_batch(encoded)
    else:
        captions = [e.caption(box=args.box, point=args.point, prompt=args.prompt) for e in encoded]
    prompt = args.box or args.point
    return [_Answer(caption.to_dict(), partial(draw_caption, image, caption, prompt=prompt))
            for image, caption in zip(images, captions, strict=True)]


def _locate(args, predictor, images) -> list[_Answer]:
    from pixelllm.viz import draw_location

    encoded = predictor.encode_batch(images)
    found = predictor.find_batch(encoded, [[args.expression]] * len(encoded), args.min_score)
    return [_Answer(location.to_dict(), partial(draw_location, image, location.box, location.expression,
                                                location.score, location.found))
            for image, (location,) in zip(images, found, strict=True)]


def _segment(args, predictor, images) -> list[_Answer]:
    from pixelllm.viz import draw_segmentation

    encoded = predictor.encode_batch(images)
    if args.all:
        return _segment_all(args, predictor, images, encoded)
    masks = predictor.segment_batch(encoded, [[args.expression]] * len(encoded), args.min_score)
    return [_Answer(segmentation.to_dict(), partial(draw_segmentation, image, segmentation), segmentation.mask)
            for image, (segmentation,) in zip(images, masks, strict=True)]


def _segment_all(args, predictor, images, encoded) -> list[_Answer]:
    """Every target the query names (``--all``); ``--mask`` writes their union."""
    import numpy as np

    from pixelllm.results import segment_all_json
    from pixelllm.viz import draw_segments

    found = predictor.segment_all_batch(encoded, [args.expression] * len(encoded))
    return [_Answer(segment_all_json(args.expression, segments, image.size),
                    partial(draw_segments, image, args.expression, segments),
                    np.any([s.mask for s in segments], axis=0) if segments else np.zeros(image.size[::-1], bool))
            for image, segments in zip(images, found, strict=True)]


def _densecap(args, predictor, images) -> list[_Answer]:
    from pixelllm.results import dense_captions_json
    from pixelllm.viz import draw_regions

    encoded = predictor.encode_batch(images)
    found = predictor.dense_caption_batch(encoded, args.max_regions, args.min_score)
    return [_Answer(dense_captions_json(regions, image.size), partial(draw_regions, image, regions))
            for image, regions in zip(images, found, strict=True)]


def _demo(args) -> None:
    from pixelllm.demo import run_demo

    out = Path(args.out)
    run_demo(_predictor(args), out)
    print(f"wrote {out / 'index.html'}")


def _synth(args) -> None:
    from pixelllm.data.synthetic import synth_main

    synth_main(args.out_dir, images=args.images, seed=args.seed, workers=args.workers)


def _train(args) -> None:
    from pixelllm.train import TrainConfig, default_run_dir, train

    out = args.out or default_run_dir(args.config)
    train(TrainConfig.load(args.config, parse_overrides(args.overrides), out=out), out, resume=args.resume)


def _eval(args) -> None:
    import inspect

    from pixelllm.evaluate.runner import evaluate

    known = [name for name, p in inspect.signature(evaluate).parameters.items()
             if p.kind is p.KEYWORD_ONLY and name != "meteor"]  # meteor: a scorer object, not a value
    options = {"split": args.split, "batch_size": args.batch_size, "limit": args.limit,
               "per_sample_path": args.per_sample, "report_path": args.report}
    for key, value in parse_overrides(args.overrides).items():
        if key not in known:
            raise ConfigError(f"unknown eval option {key!r}; the options are: {', '.join(known)}")
        options[key] = value
    result = evaluate(_predictor(args), args.task, args.data, **options)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{args.task} on {args.data}: {result.num_samples} samples")
        for name, value in result.metrics.items():
            print(f"  {name:<24}{value:10.3f}")


def _info(args) -> None:
    import torch

    from pixelllm.config import preset
    from pixelllm.model import build_model

    with torch.device("meta"):  # counts without allocating: the paper preset is 3.8 B parameters
        model = build_model(preset(args.preset))
    print(f"preset {args.preset}: image {model.config.image_size}px, LM {model.config.lm_family}")
    print(f"{'part':<22}{'total':>16}{'trainable':>16}{'frozen':>16}")
    for name, (total, trainable) in model.parameter_counts().items():
        print(f"{name:<22}{total:>16,}{trainable:>16,}{total - trainable:>16,}")


def _serve(args) -> None:
    from pixelllm.serve.app import ServeSettings
    from pixelllm.serve.server import check_binding, listen, serve

    api_key = args.api_key or os.environ.get("PIXELLLM_API_KEY") or None
    check_binding(args.host, api_key)
    sock = listen(args.host, args.port)  # before the model loads: a port in use fails at once
    settings = ServeSettings(
        model_name=Path(args.model).name if args.model else ServeSettings.model_name,  # a name, not a server path
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, timeout_s=args.timeout, read_timeout_s=args.read_timeout,
        max_upload_bytes=round(args.max_upload_mb * 2**20), max_pixels=args.max_pixels, api_key=api_key,
        cors_origins=tuple(args.cors_origin))
    serve(_predictor(args), settings, sock, log_level=args.log_level)


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` words as ``{KEY: value}``, each value read as a YAML scalar (``5e-4`` a number,
    as in YAML 1.2; ``null``, ``true``, ``[0.9, 0.95]`` as YAML reads them)."""
    import yaml

    overrides = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. steps=200 optim.lr=5e-4)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: not a YAML value ({str(exc).splitlines()[0]})") from None
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text.strip()):
            value = float(text)
        overrides[key.strip()] = value
    return overrides


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _coordinates(count: int, what: str):
    def parse(values: list[str]) -> list[float]:
        try:
            return [float(v) for v in values]
        except ValueError:
            raise InputError(f"{what} takes {count} numbers, got {' '.join(values)}") from None

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from pixelllm import __version__
    from pixelllm.assets import SHAPES_WORLD
    from pixelllm.thresholds import DENSECAP_MIN_SCORE, LOCATE_MIN_SCORE

    parser = _Parser(prog="pixelllm", epilog=SHAPES_WORLD,
                     description="PixelLLM: captions where every word has a box and a point, referring "
                                 "localization and segmentation, region and dense captions.")
    parser.add_argument("--version", action="version", version=f"pixelllm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    model_help = "checkpoint directory or Hugging Face id (default: the embedded model, of the shapes world)"

    def task_command(name: str, help_text: str, answer, expression: bool = False):
        command = commands.add_parser(name, help=help_text, description=f"{help_text[0].upper()}{help_text[1:]}.",
                                      epilog=SHAPES_WORLD)
        command.add_argument("images", nargs="+", metavar="IMAGE",
                             help="image files (any ordinary format); several are answered together; - reads one "
                                  "from stdin")
        if expression:
            command.add_argument("expression", help="the referring expression, e.g. 'the red circle'")
        command.add_argument("--model", default=None, help=model_help)
        command.add_argument("--json", action="store_true",
                             help="print JSON (INTERFACE.md): one object, or one line per image for several")
        command.add_argument("--out", default=None, metavar="PNG",
                             help="write a picture of the answer here (for several images: a directory, "
                                  "one <image name>.png each)")
        command.add_argument("--threads", type=_positive, default=None,
                             help="CPU threads (default: 1 for a small model such as the embedded one)")
        command.set_defaults(run=_batch_invariant(partial(_run_images, answer=answer)))
        return command

    def min_score(command, default: float, what: str) -> None:
        command.add_argument("--min-score", type=_fraction, default=default, metavar="S",
                             help=f"{what} (default: {default}, measured on the shapes world: docs/model_card.md)")

    caption = task_command("caption", "caption an image, with a box and a point for every word", _caption)
    where = caption.add_mutually_exclusive_group()
    where.add_argument("--box", nargs=4, metavar=("X0", "Y0", "X1", "Y1"),
                       help="caption this region instead (pixels; up to 1 px past the edge is clipped)")
    where.add_argument("--point", nargs=2, metavar=("X", "Y"), help="caption the object at this point instead")
    caption.add_argument("--prompt", default=None, help="text prompt (default: the model's own for the task)")
    locate = task_command("locate", "the box of a referring expression, with a score and whether it is found",
                          _locate, expression=True)
    min_score(locate, LOCATE_MIN_SCORE, "the least score for found: true")
    segment = task_command("segment", "the mask of a referring expression, with a score and whether it is found",
                           _segment, expression=True)
    min_score(segment, LOCATE_MIN_SCORE, "the least score for found: true")
    segment.add_argument("--all", action="store_true",
                         help="every target the query names, any number, e.g. 'all the red objects' (a system "
                              "with a segmentation codebook: pixellm)")
    segment.add_argument("--mask", default=None, metavar="PNG",
                         help="write the mask here as a black-and-white PNG the size of the image (for several "
                              "images: a directory, one <image name>_mask.png each)")
    densecap = task_command("densecap", "detect and caption every object", _densecap)
    densecap.add_argument("--max-regions", type=_positive, default=None, metavar="N",
                          help="at most this many regions (default: every one scored at least --min-score)")
    min_score(densecap, DENSECAP_MIN_SCORE, "the least proposal score of a region")

    demo = commands.add_parser("demo", help="run every task on the bundled samples; writes DIR/index.html")
    demo.add_argument("--out", default="demo", metavar="DIR", help="output directory (default: demo)")
    demo.add_argument("--model", default=None, help=model_help)
    demo.set_defaults(run=_demo)

    synth = commands.add_parser("synth", help="write the shapes world in the real dataset formats",
                                description="Write the shapes world (docs/shapes_world.md) into OUT_DIR/train, "
                                            "OUT_DIR/val and OUT_DIR/test: 80 %, 10 % and 10 % of --images.")
    synth.add_argument("out_dir", metavar="OUT_DIR", help="output directory (made if missing)")
    synth.add_argument("--images", type=int, default=1000,
                       help="images in all, shared 80/10/10 by train, val and test (default: 1000)")
    synth.add_argument("--seed", type=int, default=0, help="the world's seed: same seed, same files (default: 0)")
    synth.add_argument("--workers", type=int, default=None,
                       help="processes drawing images (default: one per CPU, at most 8)")
    synth.set_defaults(run=_synth)

    train = commands.add_parser("train", help="train from a config file (torchrun for many processes)")
    train.add_argument("--config", required=True, metavar="FILE",
                       help="the run's YAML config, e.g. configs/shapes_tiny.yaml (docs/training.md)")
    train.add_argument("--out", default=None, metavar="DIR",
                       help="run directory; ${out} in the config (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from <out>/last")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. steps=200 optim.lr=5e-4 (values as YAML scalars)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a dataset")
    evaluate.add_argument("--model", default=None, help=model_help)
    evaluate.add_argument("--task", required=True,
                          choices=["trace", "refer", "refseg", "regioncap", "densecap", "muse"],
                          help="the task and its official metrics (docs/metrics.md)")
    evaluate.add_argument("--data", required=True, help="dataset path (see docs/metrics.md)")
    evaluate.add_argument("--split", default=None, help="RefCOCO split (val, testA, testB, test; default: the data's)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate at most this many samples (default: all)")
    evaluate.add_argument("--per-sample", default=None, metavar="JSONL", help="write per-sample records here")
    evaluate.add_argument("--report", default=None, metavar="MD", help="write a markdown report here")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                          help="evaluation options, e.g. batch_size=4 images=coco/train2014")
    evaluate.set_defaults(run=_eval)

    serve = commands.add_parser("serve", help="answer every task over HTTP, with a web page (docs/serving.md)")
    serve.add_argument("--model", default=None, help=model_help)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: 127.0.0.1; any other needs --api-key)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free one, printed)")
    serve.add_argument("--api-key", default=None, help="the key every API request must send (or PIXELLLM_API_KEY)")
    serve.add_argument("--max-batch", type=_positive, default=8,
                       help="requests of a task run together (default: 8)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default: 5)")
    serve.add_argument("--max-queue", type=_positive, default=32,
                       help="requests admitted at once; more get 503 (default: 32)")
    serve.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take; then 504 (default: 30)")
    serve.add_argument("--read-timeout", type=float, default=30.0,
                       help="seconds for a request body to arrive (default: 30)")
    serve.add_argument("--max-upload-mb", type=float, default=16.0,
                       help="largest request body; more get 413 (default: 16)")
    serve.add_argument("--max-pixels", type=_positive, default=16_000_000,
                       help="largest image; more get 400 (default: 16000000)")
    serve.add_argument("--cors-origin", action="append", default=[], help="allow this web origin (repeatable)")
    serve.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: as the tasks)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="the server's log level (default: info)")
    serve.set_defaults(run=_serve)

    info = commands.add_parser("info", help="parameter counts of a preset (trainable and frozen)")
    info.add_argument("--preset", default="paper", help="tiny, base or paper (default: paper)")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        for name, count in (("box", 4), ("point", 2)):
            if getattr(args, name, None) is not None:
                setattr(args, name, _coordinates(count, f"--{name}")(getattr(args, name)))
        args.run(args)
    except PixelLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`pixelllm caption a.jpg | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
