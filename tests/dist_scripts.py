"""Programs that tests/test_distributed.py runs under `mpiexec -n K` (or plainly, K = 1).

    python tests/dist_scripts.py fid OUT.npz
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ttfm_np import distributed as D  # noqa: E402
from ttfm_np.fid import FeatureStats  # noqa: E402


def fid(out):
    """FeatureStats of 300 fixed features, each rank taking its share of the batches, merged."""
    comm = D.get_communicator("auto", device="cpu")
    feats = 3.0 + np.random.default_rng(7).standard_normal((300, 16)) @ np.random.default_rng(8).standard_normal((16, 16))
    n_batches = 300 // 25
    lo, hi = D.shard_range(n_batches, comm.rank, comm.size)     # whole batches per rank, as sampling does
    st = FeatureStats()
    for b in range(lo, hi):
        st.update(feats[25 * b:25 * (b + 1)])
    st = D.merge_feature_stats(comm, st)
    if comm.is_root:
        np.savez(out, mu=st.mu, sigma=st.sigma, n=st.n)


if __name__ == "__main__":
    {"fid": fid}[sys.argv[1]](*sys.argv[2:])
