"""Print or write the backbone support table (``docs/backbones.md``) of the installed transformers.

    python -m flmm_hf.backbones                            # print it
    python -m flmm_hf.backbones --write docs/backbones.md  # regenerate the committed table

The table is :func:`flmm_hf.image_layout.backbone_table`: every model type of transformers'
``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` with its layout or the reason it is refused.
(A module of its own so that ``-m`` does not run ``image_layout.py`` a second time.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .image_layout import backbone_table


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: print the table, or write it to ``--write PATH``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, default=None, help="write the table to this file instead of printing it")
    args = parser.parse_args(argv)
    table = backbone_table()
    if args.write is None:
        print(table, end="")
    else:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
