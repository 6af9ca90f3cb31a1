"""`deepseek-v3-convert fp8-to-bf16`: see `python conversion/fp8_to_bf16.py --help`."""

import sys

from modeling_deepseek_v3.convert import main

if __name__ == "__main__":
    sys.exit(main(["fp8-to-bf16", *sys.argv[1:]]))
