"""Shared behaviour of the command-line entry points: logging, and one-line errors with exit 2."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import warnings
from typing import Callable

from owlore_ds.errors import RunFailure, UserInputError


def setup_logging() -> None:
    # Before the launcher's variables are mapped (owlore_ds.distributed), in the same precedence.
    rank_keys = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
    main_rank = next((os.environ[k] for k in rank_keys if k in os.environ), "0") == "0"
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub at run time
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def run_main(main: Callable[[], None]) -> None:
    """Runs `main`; bad input ends with one line on stderr (from rank 0) and exit status 2."""
    # A crash in native code (an abort in a C++ library, a segfault) prints every thread's
    # Python stack, so a dead rank of a 64-GPU job says where it died.
    faulthandler.enable()
    setup_logging()
    try:
        main()
    except UserInputError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RunFailure as exc:
        # Every rank prints: the ranks agreed on the failure, and rank 0's stream may be lost.
        print(f"error: rank {os.environ.get('RANK', '0')}: {exc}", file=sys.stderr)
        sys.exit(1)
