"""The data layer: readers of the real formats, coordinate transforms, targets, collation, shards.

Import from the modules (nothing is re-exported here, so that importing one module, e.g. the
shapes-world generator, does not pull in torch):

- ``images``: ``load_image`` (any image -> RGB, EXIF applied, bombs and corrupt files refused)
- ``transforms``: ``CanvasTransform`` (original <-> canvas), ``prepare_image``
- ``samples``: ``Sample``, ``Region``, ``Narrative``, ``Utterance``, ``Question``
- readers: ``ln``, ``vidln``, ``refcoco``, ``vg``, ``coco``, ``muse`` (each ``*Reader`` has ``report``)
- ``ln``: the official and time-window token alignments of Localized Narratives
- ``targets``, ``pipeline``, ``collate``: per-task targets -> ``Example`` -> the batch contract
- ``words``: tokens back into words with boxes; ``shards``: tar shards and their streaming dataset

Frames and the batch contract: docs/architecture.md; formats and choices: docs/data.md.
"""
