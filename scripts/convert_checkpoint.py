"""Convert a checkpoint written before the trunk-and-heads layout into it (run once per checkpoint).

    python scripts/convert_checkpoint.py OLD_DIR [NEW_DIR]     # NEW_DIR defaults to OLD_DIR, in place

Before, the heads were fields of the model config (``location_head``, ``mask_head``,
``proposal_head``, ``mask_refiner``, ``refer_reranker``, ``scene_captioner``, the loss weights
``location_loss_weight`` ... ``box_pixel_word_loss_weight``) and attributes of the model; now they
are entries of ``heads`` and modules under ``heads.<name>``. Weights are renamed, not changed; a
``lora_alpha`` of None meant the rank (scale 1) and is written out, since None now means twice the
rank. The tokenizer files are copied as they are.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

RENAMES = {  # old weight prefix -> new
    "location_head.": "heads.location.locator.",
    "mask_head.": "heads.mask.",
    "proposal_head.": "heads.proposals.",
    "pixel_word_head.": "heads.pixel_words.linear.",
    "mask_refiner.": "heads.mask_refiner.",
    "refer_reranker.": "heads.refer_reranker.",
    "scene_captioner.": "heads.scene.",
}


def convert_config(old: dict) -> dict:
    """The ``config.json`` of the new layout from the old one."""
    config = dict(old)
    if config.pop("word_loss_weight", 0.0) or config["extractor"].pop("box_geometry", False):
        raise SystemExit("error: the box word head and box geometry no longer exist; cannot convert this checkpoint")
    location = {**config.pop("location_head"), "loss_weight": config.pop("location_loss_weight"),
                "average": config.pop("location_average")}
    heads = {"location": location,
             "mask": {**config.pop("mask_head"), "prompt_box": config.pop("mask_prompt_box")},
             "proposals": config.pop("proposal_head")}
    pixel_words = config.pop("box_pixel_word_loss_weight", 0.0)
    if pixel_words:
        heads["pixel_words"] = {"weight": pixel_words}
    for old_name, new_name in (("mask_refiner", "mask_refiner"), ("refer_reranker", "refer_reranker"),
                               ("scene_captioner", "scene")):
        section = config.pop(old_name, None)
        if section is not None:
            heads[new_name] = section
    config["heads"] = heads
    if config.get("lora_rank", 0) > 0 and config.get("lora_alpha") is None:
        config["lora_alpha"] = config["lora_rank"]
    return config


def convert_weights(weights: dict) -> dict:
    renamed = {}
    for name, tensor in weights.items():
        if name.startswith("word_head."):
            raise SystemExit("error: the box word head no longer exists; this checkpoint cannot be converted")
        prefix = next((p for p in RENAMES if name.startswith(p)), None)
        renamed[RENAMES[prefix] + name[len(prefix):] if prefix else name] = tensor
    return renamed


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    source = Path(argv[0])
    target = Path(argv[1]) if len(argv) == 2 else source
    old = json.loads((source / "config.json").read_text())
    if "heads" in old:
        print(f"{source} is already in the heads layout")
        return 0
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".converting-") as tmp:
        save_file(convert_weights(load_file(source / "model.safetensors")), str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "config.json").write_text(json.dumps(convert_config(old), indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (source / name).is_file() and source != target:
                shutil.copy(source / name, Path(tmp) / name)
        for name in sorted(p.name for p in Path(tmp).iterdir()):  # config.json sorts first: write it last
            if name != "config.json":
                (Path(tmp) / name).replace(target / name)
        (Path(tmp) / "config.json").replace(target / "config.json")
    print(f"converted {source} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
