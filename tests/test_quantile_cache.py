"""QuantileCache: local boundaries equal the service's exact ones; bucketing equals torch.bucketize per unit."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from eidetic.client import EideticClient
from eidetic.torch.quantile_cache import QuantileCache, local_boundaries
from tests.helpers import make_layer, post_arrow, random_rows

REPO = Path(__file__).resolve().parents[1]


@settings(max_examples=60, deadline=None)
@given(
    matrix=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 80), st.integers(1, 6)),
        elements=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-100, 100, width=32)),
    ),
    n_quantiles=st.integers(2, 30),
)
def test_local_boundaries_are_numpy_inverted_cdf(matrix, n_quantiles):
    expected = np.quantile(matrix, np.arange(1, n_quantiles) / n_quantiles, axis=0, method="inverted_cdf").T
    np.testing.assert_array_equal(local_boundaries(torch.from_numpy(matrix), n_quantiles).numpy(), expected)


def per_unit_bucketize(probe: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """The reference: torch.bucketize(right=False) one unit at a time."""
    return torch.stack(
        [torch.bucketize(probe[:, u].contiguous(), boundaries[u], right=False) for u in range(boundaries.shape[0])],
        dim=1,
    )


# 5 and 33: the unrolled comparisons (up to 32 boundaries); 40: the binary search
@pytest.mark.parametrize("n_quantiles", [5, 33, 40])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_bucketize_equals_torch_bucketize_unit_by_unit(n_quantiles, compiled):
    generator = torch.Generator().manual_seed(0)
    values = torch.relu(torch.randn(500, 7, generator=generator))  # ReLU: repeated boundaries at 0
    cache = QuantileCache(local_boundaries(values, n_quantiles), compiled=compiled)
    probe = torch.cat([torch.randn(100, 7, generator=generator), cache.boundaries.T])  # ties on boundaries too
    expected = per_unit_bucketize(probe, cache.boundaries)
    buckets = cache.bucketize(probe)
    assert buckets.dtype == torch.int64 and torch.equal(buckets, expected)
    assert int(buckets.max()) <= n_quantiles - 1 and cache.stats.values_bucketed == probe.numel()
    narrow = cache.bucketize(probe[:3], out_int32=True)  # another batch size, and torch.bucketize's out_int32
    assert narrow.dtype == torch.int32 and torch.equal(narrow.long(), expected[:3])
    assert cache.bucketize(probe[:0]).shape == (0, 7)
    with pytest.raises(ValueError):
        cache.bucketize(torch.zeros(3, 6))


def test_one_quantile_means_one_bucket():
    cache = QuantileCache(torch.empty(4, 0))
    assert torch.equal(cache.bucketize(torch.randn(6, 4)), torch.zeros(6, 4, dtype=torch.long))


def test_bucketing_falls_back_to_eager_with_a_warning_when_compiling_fails(tmp_path):
    """No working C++ compiler (a real failure of torch.compile, in a fresh process): same buckets, one warning."""
    script = (
        "import torch\n"
        "from eidetic.torch.quantile_cache import QuantileCache, local_boundaries\n"
        "values = torch.randn(200, 5, generator=torch.Generator().manual_seed(1))\n"
        "cache = QuantileCache(local_boundaries(values, 6))\n"
        "first, second = cache.bucketize(values), cache.bucketize(values[:50])\n"
        "eager = QuantileCache(cache.boundaries, compiled=False).bucketize(values)\n"
        "assert torch.equal(first, eager) and torch.equal(second, eager[:50])\n"
        "print('same buckets')\n"
    )
    environment = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "same buckets" in done.stdout
    assert done.stderr.count("using the eager kernel") == 1


def test_the_cache_holds_the_services_boundaries_and_refreshes_to_newer_versions(service, api):
    run_id, layer_id = make_layer(api, dim=4)
    rows = random_rows(300, 4)
    post_arrow(api, run_id, layer_id, rows)
    with EideticClient(service.base_url, service.write_key) as client:
        client.compute_quantiles(run_id, layer_id, 8)
        cache = QuantileCache.from_service(client, run_id, layer_id)
        assert cache.version == 1
        assert torch.equal(cache.boundaries, local_boundaries(torch.from_numpy(rows.values), 8))
        assert cache.refresh(client) is False
        post_arrow(api, run_id, layer_id, random_rows(100, 4, seed=9))
        client.compute_quantiles(run_id, layer_id, 8)
        assert cache.refresh(client) is True and cache.version == 2 and cache.stats.refreshes == 1
