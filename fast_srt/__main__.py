"""`python -m fast_srt ...` runs the CLI: the form torchrun launches (`torchrun --nproc_per_node N -m fast_srt train`)."""

import sys

from fast_srt.cli import main

if __name__ == "__main__":
    sys.exit(main())
