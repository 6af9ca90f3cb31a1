"""`python -m modeling_deepseek_v3.convert_cli ...` is `deepseek-v3-convert ...`."""

import sys

from .convert import main

if __name__ == "__main__":
    sys.exit(main())
