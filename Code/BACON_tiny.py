"""Distil Tiny-ImageNet (--dataset TinyImageNet), from tinyimagenet.pt or the extracted archive.

Thin entry point: it only sets the default dataset; every flag of the
reference script is accepted and the shared loop (pipeline.run) does the work.
Run `python BACON_tiny.py --help` for the flags and their effective defaults.
"""

import sys

from cli import main

if __name__ == "__main__":
    sys.exit(main({"dataset": "TinyImageNet"}))
