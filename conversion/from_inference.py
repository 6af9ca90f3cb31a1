"""`deepseek-v3-convert from-inference`: see `python conversion/from_inference.py --help`."""

import sys

from modeling_deepseek_v3.convert import main

if __name__ == "__main__":
    sys.exit(main(["from-inference", *sys.argv[1:]]))
