"""`deepseek-v3-convert verify`: see `python conversion/verify.py --help`."""

import sys

from modeling_deepseek_v3.convert import main

if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))
