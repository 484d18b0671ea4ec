"""The ``pixelllm`` command line.

Exit status: 0 on success, 2 with one ``error: `` line on stderr for a problem with what the user
gave (``PixelLLMError``, bad arguments), 1 for a fault of the program itself.
"""

from __future__ import annotations

import argparse
import sys

from pixelllm.errors import PixelLLMError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise PixelLLMError(f"{message} (see: {self.prog} --help)")


def _info(args) -> None:
    import torch

    from pixelllm.config import preset
    from pixelllm.model import build_model

    with torch.device("meta"):  # counts without allocating: the paper preset is 3.8 B parameters
        model = build_model(preset(args.preset))
    rows = [(name, module) for name, module in model.named_children()]
    print(f"preset {args.preset}: image {model.config.image_size}px, LM {model.config.lm_family}")
    print(f"{'part':<16}{'total':>16}{'trainable':>16}{'frozen':>16}")
    for name, module in [*rows, ("all", model)]:
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(f"{name:<16}{total:>16,}{trainable:>16,}{total - trainable:>16,}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pixelllm", description="PixelLLM: pixel-aligned captions, localization, segmentation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = commands.add_parser("info", help="parameter counts of a preset (trainable and frozen)")
    info.add_argument("--preset", default="paper", help="tiny, base or paper (default: paper)")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
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
