"""Process settings that must be in place before torch is imported. Every entry-point script imports this
module before anything else:

    import util.env_setup  # noqa: F401  (sets GOMP_SPINCOUNT before torch is imported)

GNU OpenMP's worker threads spin-wait for a long time (GOMP_SPINCOUNT 300,000 by default). When other processes
keep the cores busy, small tensor operations then ran 10-100x slower: a main_tokenizer.py step took 2.8 s
instead of 0.17 s, and 0.27 s with a spin count of 10,000 (docs/performance.md). A short spin costs nothing on
an idle machine. libgomp reads the variable once, when torch loads it, hence the import order.
A value the user set (GOMP_SPINCOUNT, or OMP_WAIT_POLICY, which chooses the spin itself) is left alone.
"""
import os

SPIN_COUNT = "10000"

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
