"""`deepseek-v3-convert to-inference`: see `python conversion/to_inference.py --help`."""

import sys

from modeling_deepseek_v3.convert import main

if __name__ == "__main__":
    sys.exit(main(["to-inference", *sys.argv[1:]]))
