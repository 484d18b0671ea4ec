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


def _emit(args, result: dict, picture=None) -> None:
    """Print ``result`` as JSON (``--json``) or as text, and write ``--out`` PNG if asked."""
    if args.out:
        from pixelllm.viz import save_picture

        save_picture(picture(), args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(_as_text(result))


def _as_text(result: dict) -> str:
    if "caption" in result and "words" in result:
        words = " ".join(f"{w['text']}@({w['point'][0]:.0f},{w['point'][1]:.0f})" for w in result["words"])
        return f"{result['caption']}\n{words}"
    if "regions" in result:
        return "\n".join(f"{r['score']:.2f} [{', '.join(f'{v:.0f}' for v in r['box'])}] {r['caption']}"
                         for r in result["regions"]) or "(no regions)"
    box = ", ".join(f"{v:.1f}" for v in result["box"])
    area = f" mask area {result['area']} px" if "area" in result else ""
    return f"{result['expression']}: [{box}]{area}"


def _caption(args) -> None:
    from pixelllm.data.images import load_image

    image = load_image(args.image)
    encoded = _predictor(args).encode(image)
    caption = encoded.caption(box=args.box, point=args.point, prompt=args.prompt)

    def picture():
        from pixelllm.viz import draw_caption

        return draw_caption(image, caption, prompt=args.box or args.point)

    _emit(args, caption.to_dict(), picture)


def _locate(args) -> None:
    from pixelllm.data.images import load_image
    from pixelllm.results import location_json

    image = load_image(args.image)
    box = _predictor(args).encode(image).locate(args.expression)
    result = location_json(args.expression, box, image.size)

    def picture():
        from pixelllm.viz import draw_location

        return draw_location(image, box, args.expression)

    _emit(args, result, picture)


def _segment(args) -> None:
    from pixelllm.data.images import load_image

    image = load_image(args.image)
    segmentation = _predictor(args).encode(image).segment(args.expression)

    def picture():
        from pixelllm.viz import draw_segmentation

        return draw_segmentation(image, segmentation)

    _emit(args, segmentation.to_dict(), picture)


def _densecap(args) -> None:
    from pixelllm.data.images import load_image
    from pixelllm.results import dense_captions_json

    image = load_image(args.image)
    regions = _predictor(args).encode(image).dense_caption(max_regions=args.max_regions)
    result = dense_captions_json(regions, image.size)

    def picture():
        from pixelllm.viz import draw_regions

        return draw_regions(image, regions)

    _emit(args, result, picture)


def _demo(args) -> None:
    from pixelllm.demo import run_demo

    out = Path(args.out)
    run_demo(_predictor(args), out)
    print(f"wrote {out / 'index.html'}")


def _synth(args) -> None:
    from pixelllm.data.synthetic import synth_main

    synth_main(args.out_dir, images=args.images, seed=args.seed, workers=args.workers)


def _train(args) -> None:
    from pixelllm.train import TrainConfig, train

    config = TrainConfig.load(args.config, parse_overrides(args.overrides))
    train(config, args.out or Path("runs") / Path(args.config).stem, resume=args.resume)


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pixelllm", description="PixelLLM: pixel-aligned captions, localization, segmentation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def task_command(name: str, help_text: str, run, expression: bool = False):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("image", help="image file (any ordinary format)")
        if expression:
            command.add_argument("expression", help="the referring expression, e.g. 'the red circle'")
        command.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
        command.add_argument("--json", action="store_true", help="print one JSON object")
        command.add_argument("--out", default=None, help="write a picture (PNG) here")
        command.add_argument("--threads", type=_positive, default=None,
                             help="CPU threads (default: 1 for a small model such as the embedded one)")
        command.set_defaults(run=_batch_invariant(run))
        return command

    caption = task_command("caption", "caption an image, with a location for every word", _caption)
    where = caption.add_mutually_exclusive_group()
    where.add_argument("--box", nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="caption this region")
    where.add_argument("--point", nargs=2, metavar=("X", "Y"), help="caption the object at this point")
    caption.add_argument("--prompt", default=None, help="text prompt (default: the model's)")
    task_command("locate", "the box of a referring expression", _locate, expression=True)
    task_command("segment", "the mask of a referring expression", _segment, expression=True)
    densecap = task_command("densecap", "detect and caption every object", _densecap)
    densecap.add_argument("--max-regions", type=int, default=None, help="at most this many regions")

    demo = commands.add_parser("demo", help="run every task on the bundled samples; writes DIR/index.html")
    demo.add_argument("--out", default="demo", help="output directory (default: demo)")
    demo.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    demo.set_defaults(run=_demo)

    synth = commands.add_parser("synth", help="write the shapes world in the real dataset formats")
    synth.add_argument("out_dir")
    synth.add_argument("--images", type=int, default=1000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=None)
    synth.set_defaults(run=_synth)

    train = commands.add_parser("train", help="train from a config file (torchrun for many processes)")
    train.add_argument("--config", required=True)
    train.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from <out>/last")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. steps=200 optim.lr=5e-4 (values as YAML scalars)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a dataset")
    evaluate.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    evaluate.add_argument("--task", required=True, choices=["trace", "refer", "refseg", "regioncap", "densecap"])
    evaluate.add_argument("--data", required=True, help="dataset path (see docs/metrics.md)")
    evaluate.add_argument("--split", default=None, help="RefCOCO split (val, testA, testB, test)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate at most this many samples")
    evaluate.add_argument("--per-sample", default=None, help="write per-sample JSONL here")
    evaluate.add_argument("--report", default=None, help="write a markdown report here")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                          help="evaluation options, e.g. batch_size=4 images=coco/train2014")
    evaluate.set_defaults(run=_eval)

    serve = commands.add_parser("serve", help="answer every task over HTTP, with a web page (docs/serving.md)")
    serve.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (any but the loopback needs --api-key)")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    serve.add_argument("--api-key", default=None, help="the key every API request must send (or PIXELLLM_API_KEY)")
    serve.add_argument("--max-batch", type=_positive, default=8, help="requests of a task run together (default 8)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    serve.add_argument("--max-queue", type=_positive, default=32, help="requests admitted at once; more get 503")
    serve.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take; then 504")
    serve.add_argument("--read-timeout", type=float, default=30.0, help="seconds for a request body to arrive")
    serve.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body; more get 413")
    serve.add_argument("--max-pixels", type=_positive, default=16_000_000, help="largest image; more get 400")
    serve.add_argument("--cors-origin", action="append", default=[], help="allow this web origin (repeatable)")
    serve.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: as the tasks)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
