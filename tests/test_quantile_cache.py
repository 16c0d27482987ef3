"""QuantileCache: local boundaries equal the service's exact ones; bucketing equals torch.bucketize per unit."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from model.client import EideticClient
from model.quantile_cache import QuantileCache, local_boundaries
from tests.helpers import make_layer, post_arrow, random_rows


@settings(max_examples=60, deadline=None)
@given(
    matrix=hnp.arrays(np.float32, st.tuples(st.integers(1, 80), st.integers(1, 6)),
                      elements=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-100, 100, width=32))),
    n_quantiles=st.integers(2, 30),
)
def test_local_boundaries_are_numpy_inverted_cdf(matrix, n_quantiles):
    expected = np.quantile(matrix, np.arange(1, n_quantiles) / n_quantiles, axis=0, method="inverted_cdf").T
    np.testing.assert_array_equal(local_boundaries(torch.from_numpy(matrix), n_quantiles).numpy(), expected)


@pytest.mark.parametrize("n_quantiles", [5, 40])  # the comparison path (few boundaries) and the search path
def test_bucketize_equals_torch_bucketize_unit_by_unit(n_quantiles):
    generator = torch.Generator().manual_seed(0)
    values = torch.relu(torch.randn(500, 7, generator=generator))  # ReLU: repeated boundaries at 0
    cache = QuantileCache(local_boundaries(values, n_quantiles))
    probe = torch.cat([torch.randn(100, 7, generator=generator), cache.boundaries.T])  # ties on boundaries too
    expected = torch.stack([torch.bucketize(probe[:, u].contiguous(), cache.boundaries[u], right=False) for u in range(7)], dim=1)
    assert torch.equal(cache.bucketize(probe), expected)
    assert int(cache.bucketize(probe).max()) <= n_quantiles - 1 and cache.stats.values_bucketed == 2 * probe.numel()
    with pytest.raises(ValueError):
        cache.bucketize(torch.zeros(3, 6))


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
