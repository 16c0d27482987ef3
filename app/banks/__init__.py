"""Memory banks: stored keys (and optional values) searched by nearest neighbour, written under a policy.

- `schema`: the bank's row, its partition of items and HNSW index (create, read, drop);
- `policy`: writes, each planned by `eidetic.wire.bank_policy` and applied under the bank's row lock;
- `search`: batched k-nearest-neighbour search, its vote, and hit counts;
- `feed`: the change feed (`since=version`) and the Arrow snapshot the device caches follow;
- `growing`: a segmented bank's growing items, held in the service between searches and followed by version;
- `segments`: a segmented bank's growing and sealed segments, and the merge that seals and compacts them;
- `merger`: the service's background merger.
"""

from app.banks.feed import Changes, changes, snapshot_batches, snapshot_schema
from app.banks.growing import GrowingCache
from app.banks.merger import BackgroundMerger, merge_now, start_merge
from app.banks.policy import NewItems, WriteResult, delete_item, write_items
from app.banks.schema import METRICS, Bank, create_bank, delete_bank, get_bank, items_partition, list_banks
from app.banks.search import MAX_EF_SEARCH, Neighbours, record_hits, search, similarity_from_distance, vote
from app.banks.segments import MergeReport, Segment, growing_rows, sealed_segments

__all__ = [
    "MAX_EF_SEARCH",
    "METRICS",
    "BackgroundMerger",
    "Bank",
    "Changes",
    "GrowingCache",
    "MergeReport",
    "Neighbours",
    "NewItems",
    "Segment",
    "WriteResult",
    "changes",
    "create_bank",
    "delete_bank",
    "delete_item",
    "get_bank",
    "growing_rows",
    "items_partition",
    "list_banks",
    "merge_now",
    "record_hits",
    "sealed_segments",
    "search",
    "similarity_from_distance",
    "snapshot_batches",
    "snapshot_schema",
    "start_merge",
    "vote",
    "write_items",
]
