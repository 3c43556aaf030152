"""The lab's evaluation, as before the command existed: ``fine-pruning eval`` (pruning/evaluate.py).

    python scripts/eval.py data/cl/valid.h5 data/bd/bd_valid.h5 models/bd_net.h5
"""
import sys

from pruning.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
