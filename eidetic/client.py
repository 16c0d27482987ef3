"""A small REST client of the Eidetic service: runs, layers, activation batches and summaries.

Every error answer of the service becomes one typed exception carrying its JSON error
(code, message, field), so callers branch on `code`, never on message text. Later
resources (quantiles, memory banks) add methods on top of `request`.

Arrow streams (activations, bank snapshots) are only returned whole: the service ends each
with an empty record batch whose custom metadata counts the rows sent, and drops the
connection when it fails midway; anything else raises IncompleteStream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pyarrow as pa

from eidetic.config import ClientSettings
from eidetic.wire.bank_items import ITEM_COLUMNS, items_to_arrow

ARROW_STREAM = "application/vnd.apache.arrow.stream"
END_OF_ROWS = b"eidetic.end"  # custom metadata of an Arrow stream's last, empty record batch: the rows sent
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_ITEM_FIELDS = frozenset(ITEM_COLUMNS)


class EideticAPIError(Exception):
    """An error answer of the service: its HTTP status and its JSON error body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field: {field})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    @property
    def retryable(self) -> bool:
        """Worth sending again unchanged: the service or its database was busy or down."""
        return self.status >= 500 or self.status in _RETRYABLE_STATUSES

    @classmethod
    def from_response(cls, response: httpx.Response) -> EideticAPIError:
        try:
            error = response.json()["error"]
            return cls(response.status_code, str(error["code"]), str(error["message"]), error.get("field"))
        except (ValueError, KeyError, TypeError):  # not our JSON shape (a proxy, a crash page)
            text = response.text[:200].strip() or response.reason_phrase
            return cls(response.status_code, "http_error", text)


class IncompleteStream(EideticAPIError):
    """An Arrow stream that did not arrive whole: the connection broke, or its end record is missing or
    disagrees with the rows that came. Reading again is safe (a stream reads one snapshot)."""

    def __init__(self, message: str, status: int = 200) -> None:
        super().__init__(status, "incomplete_stream", message)

    @property
    def retryable(self) -> bool:
        return True


@dataclass(frozen=True)
class RunInfo:
    id: int
    name: str
    config: dict
    status: str


@dataclass(frozen=True)
class LayerInfo:
    id: int
    run_id: int
    name: str
    dim: int
    kind: str


@dataclass(frozen=True)
class IngestReceipt:
    """The service's acknowledgement of a batch; `duplicate` means an earlier attempt already stored it."""

    batch_id: str
    rows: int
    duplicate: bool


@dataclass(frozen=True)
class LayerSummary:
    """Per-unit statistics of a layer's stored rows (NaN where the service had none)."""

    rows: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray


@dataclass(frozen=True)
class KernelRecords:
    """One (task, layer) record set of a run: per kernel (index i at i), its mean change and importance."""

    task: int
    layer: str
    intervals: int
    change: np.ndarray
    importance: np.ndarray


class EideticClient:
    """Synchronous client over one httpx connection pool; use as a context manager or call close()."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http or httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    @classmethod
    def from_settings(cls, settings: ClientSettings | None = None) -> EideticClient:
        settings = settings or ClientSettings()
        return cls(settings.eidetic_url, settings.api_key(), timeout=settings.request_timeout_s)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call; an error answer raises EideticAPIError, a network failure raises httpx.TransportError."""
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            raise EideticAPIError.from_response(response)
        return response

    # ---------------------------------------------------------------- runs and layers

    def create_run(self, name: str, config: dict | None = None) -> RunInfo:
        body = self.request("POST", "/v1/runs", json={"name": name, "config": config or {}}).json()
        return _run(body)

    def get_run(self, run_id: int) -> RunInfo:
        return _run(self.request("GET", f"/v1/runs/{run_id}").json())

    def set_run_status(self, run_id: int, status: str) -> RunInfo:
        return _run(self.request("PATCH", f"/v1/runs/{run_id}", json={"status": status}).json())

    def record_metrics(self, run_id: int, metrics: dict, status: str | None = None) -> RunInfo:
        """Merges metrics (JSON-able) into the run's, optionally with a new status."""
        body = {"metrics": metrics, **({"status": status} if status else {})}
        return _run(self.request("PATCH", f"/v1/runs/{run_id}", json=body).json())

    def create_layer(
        self, run_id: int, name: str, dim: int, kind: str = "activations", *, sketch: bool = True
    ) -> LayerInfo:
        """A layer of the run; `sketch=False` skips the quantile sketches (faster ingest)."""
        body = {"name": name, "dim": dim, "kind": kind, "sketch": sketch}
        return _layer(self.request("POST", f"/v1/runs/{run_id}/layers", json=body).json())

    def list_layers(self, run_id: int) -> list[LayerInfo]:
        return [_layer(body) for body in self.request("GET", f"/v1/runs/{run_id}/layers").json()["layers"]]

    def get_layer(self, run_id: int, layer_id: int) -> LayerInfo:
        return _layer(self.request("GET", f"/v1/runs/{run_id}/layers/{layer_id}").json())

    # ---------------------------------------------------------------- activations

    def ingest_arrow(self, run_id: int, layer_id: int, batch_id: str, body: bytes) -> IngestReceipt:
        """Sends one Arrow IPC batch; the batch id makes a resend of the same batch a no-op."""
        response = self.request(
            "POST",
            f"/v1/runs/{run_id}/layers/{layer_id}/activations",
            params={"batch_id": batch_id},
            content=body,
            headers={"Content-Type": ARROW_STREAM},
        )
        answer = response.json()
        return IngestReceipt(batch_id=answer["batch_id"], rows=int(answer["rows"]), duplicate=bool(answer["duplicate"]))

    def read_activations(
        self, run_id: int, layer_id: int, *, limit: int | None = None, cursor: str | None = None, **filters: Any
    ) -> pa.Table:
        """Stored rows as one Arrow table read from one snapshot, all of them unless `limit`; filters are
        the route's (task, label, epoch, step_min, step_max, sample_id). IncompleteStream unless whole."""
        params = {"format": "arrow", "limit": limit, "cursor": cursor, **filters}
        params = {name: value for name, value in params.items() if value is not None}
        _, table = self.read_arrow_stream(f"/v1/runs/{run_id}/layers/{layer_id}/activations", params=params)
        return table

    def layer_summary(self, run_id: int, layer_id: int, **filters: Any) -> LayerSummary:
        """Per-unit count, mean, std, min, max; filters are the route's (task, label, epoch, step_min, ...)."""
        params = {name: value for name, value in filters.items() if value is not None}
        answer = self.request("GET", f"/v1/runs/{run_id}/layers/{layer_id}/summary", params=params).json()
        stats = {name: _floats(answer[name]) for name in ("mean", "std", "min", "max")}
        return LayerSummary(rows=int(answer["rows"]), **stats)

    # ---------------------------------------------------------------- quantiles

    def compute_quantiles(
        self, run_id: int, layer_id: int, n_quantiles: int, method: str = "exact", **filters: Any
    ) -> dict:
        """A new quantile set of the layer (filters: task, label, epoch, step_min, step_max)."""
        body = {"n_quantiles": n_quantiles, "method": method, **{k: v for k, v in filters.items() if v is not None}}
        return self.request("POST", f"/v1/runs/{run_id}/layers/{layer_id}/quantiles", json=body).json()

    def latest_quantiles(self, run_id: int, layer_id: int, method: str | None = None) -> dict:
        params = {"method": method} if method else {}
        return self.request("GET", f"/v1/runs/{run_id}/layers/{layer_id}/quantiles/latest", params=params).json()

    def quantile_set(self, set_id: int) -> dict:
        return self.request("GET", f"/v1/quantile-sets/{set_id}").json()

    # ---------------------------------------------------------------- memory banks

    def create_bank(self, name: str, dim: int, capacity: int, **options: Any) -> dict:
        """A memory bank (options: metric, policy, similarity_threshold, value_dim)."""
        body = {"name": name, "dim": dim, "capacity": capacity, **options}
        return self.request("POST", "/v1/memory-banks", json=body).json()

    def get_bank(self, bank_id: int) -> dict:
        return self.request("GET", f"/v1/memory-banks/{bank_id}").json()

    def list_banks(self) -> list[dict]:
        return self.request("GET", "/v1/memory-banks").json()["banks"]

    def find_bank(self, name: str) -> dict | None:
        return next((bank for bank in self.list_banks() if bank["name"] == name), None)

    def delete_bank(self, bank_id: int) -> None:
        self.request("DELETE", f"/v1/memory-banks/{bank_id}")

    def write_items(self, bank_id: int, items: list[dict]) -> dict:
        """Writes items ({"key", "label", "value", "confidence", "meta"}) under the bank's policy.

        When every key is a numpy array the batch goes as an Arrow IPC stream, which the service
        parses several times faster than JSON; otherwise (lists, or a field it does not know,
        which the service then names) as JSON.
        """
        path = f"/v1/memory-banks/{bank_id}/items"
        body = _items_arrow(items)
        if body is None:
            return self.request("POST", path, json={"items": items}).json()
        return self.request("POST", path, content=body, headers={"Content-Type": ARROW_STREAM}).json()

    def search(
        self,
        bank_id: int,
        queries: np.ndarray,
        k: int = 10,
        *,
        exact: bool = False,
        ef_search: int = 100,
        labels: list[int] | None = None,
        with_meta: bool = False,
    ) -> list[dict]:
        """Per query: ids, scores, labels, prediction, confidence (and `metas` with `with_meta`)."""
        body = {
            "queries": np.asarray(queries, dtype=np.float32).tolist(),
            "k": k,
            "exact": exact,
            "ef_search": ef_search,
        }
        if labels is not None:
            body["labels"] = labels
        if with_meta:
            body["with_meta"] = True
        return self.request("POST", f"/v1/memory-banks/{bank_id}/search", json=body).json()["results"]

    def changes(self, bank_id: int, since: int, limit: int = 1000) -> dict:
        return self.request(
            "GET", f"/v1/memory-banks/{bank_id}/changes", params={"since": since, "limit": limit}
        ).json()

    def snapshot(self, bank_id: int) -> bytes:
        """The whole bank as Arrow IPC bytes (schema metadata: bank_version, metric), checked to be whole."""
        body, _ = self.read_arrow_stream(f"/v1/memory-banks/{bank_id}/snapshot")
        return body

    def snapshot_table(self, bank_id: int) -> pa.Table:
        """The whole bank as an Arrow table (schema metadata: bank_version, metric), checked to be whole."""
        _, table = self.read_arrow_stream(f"/v1/memory-banks/{bank_id}/snapshot")
        return table

    def delete_item(self, bank_id: int, item_id: int) -> int:
        """Deletes one item (leaving a tombstone); returns the bank's new version."""
        return int(self.request("DELETE", f"/v1/memory-banks/{bank_id}/items/{item_id}").json()["version"])

    # ---------------------------------------------------------------- kernel records

    def write_kernel_records(
        self,
        run_id: int,
        task: int,
        layer: str,
        change: np.ndarray | list[float],
        importance: np.ndarray | list[float],
        intervals: int = 0,
    ) -> dict:
        """Stores one task's per-kernel change and importance of a layer (again: replaces them)."""
        body = {
            "task": task,
            "layer": layer,
            "change": np.asarray(change, dtype=np.float64).tolist(),
            "importance": np.asarray(importance, dtype=np.float64).tolist(),
            "intervals": intervals,
        }
        return self.request("POST", f"/v1/runs/{run_id}/kernel-records", json=body).json()

    def kernel_records(self, run_id: int, *, task: int | None = None, layer: str | None = None) -> list[KernelRecords]:
        """The run's record sets by task then layer, filtered to one task and/or layer if given."""
        params = {name: value for name, value in (("task", task), ("layer", layer)) if value is not None}
        answer = self.request("GET", f"/v1/runs/{run_id}/kernel-records", params=params).json()
        return [
            KernelRecords(
                task=int(found["task"]),
                layer=found["layer"],
                intervals=int(found["intervals"]),
                change=np.asarray(found["change"], dtype=np.float64),
                importance=np.asarray(found["importance"], dtype=np.float64),
            )
            for found in answer["records"]
        ]

    def top_kernels(
        self,
        run_id: int,
        task: int,
        layer: str,
        *,
        k: int | None = None,
        ratio: float | None = None,
        by: str = "importance",
    ) -> dict:
        """The layer's top kernels for the task by change or importance: give k (a count) or ratio (a share)."""
        params = {"task": task, "layer": layer, "by": by, "k": k, "ratio": ratio}
        params = {name: value for name, value in params.items() if value is not None}
        return self.request("GET", f"/v1/runs/{run_id}/kernel-records/top", params=params).json()

    # ---------------------------------------------------------------- GLOM's islands

    def island_banks(self, run_id: int) -> list[dict]:
        """The run's island banks ({"island_set", "level", "bank_id", "size"}), by island set then level."""
        return self.request("GET", f"/v1/runs/{run_id}/islands").json()["banks"]

    def island_tree(self, run_id: int, island_set: str, sample: int) -> list[dict]:
        """The parse tree of one stored image: its top islands, largest first, each with its "children"."""
        return self.request("GET", f"/v1/runs/{run_id}/islands/{island_set}/{sample}/tree").json()["roots"]

    def nearest_islands(
        self, run_id: int, island_set: str, sample: int, level: int, k: int = 5, *, exact: bool = False
    ) -> list[dict]:
        """For each island of the image at `level`: {"island", "neighbours"}, the k most alike of other images
        (through the level bank's HNSW index, or an exact scan)."""
        params: dict[str, Any] = {"level": level, "k": k, "exact": exact}
        path = f"/v1/runs/{run_id}/islands/{island_set}/{sample}/neighbours"
        return self.request("GET", path, params=params).json()["results"]

    # ---------------------------------------------------------------- Arrow streams

    def read_arrow_stream(self, path: str, **kwargs: Any) -> tuple[bytes, pa.Table]:
        """A GET answered by an Arrow stream: its bytes and its table, or IncompleteStream unless it came whole."""
        with self._http.stream("GET", path, **kwargs) as response:
            if response.is_error:
                response.read()
                raise EideticAPIError.from_response(response)
            try:
                body = response.read()
            except httpx.TransportError as error:  # the service drops the connection when a stream fails
                raise IncompleteStream(f"the stream of {path} broke off: {error!r}", response.status_code) from error
        return body, whole_stream(body)

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EideticClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def whole_stream(body: bytes) -> pa.Table:
    """The table an Arrow stream of the service holds, once its end record shows every row arrived."""
    batches: list[pa.RecordBatch] = []
    arrived = 0
    counted: int | None = None
    try:
        reader = pa.ipc.open_stream(body)
        while True:
            try:
                batch, metadata = reader.read_next_batch_with_custom_metadata()
            except StopIteration:
                break
            if counted is not None:
                raise IncompleteStream("record batches follow the stream's end record")
            if metadata is not None and END_OF_ROWS in metadata:
                counted = int(metadata[END_OF_ROWS])
                continue
            batches.append(batch)
            arrived += batch.num_rows
    except (pa.ArrowException, OSError, ValueError) as error:  # pyarrow: ArrowInvalid, or OSError when short
        raise IncompleteStream(f"not a whole Arrow stream: {error}") from error
    if counted is None:
        raise IncompleteStream(f"the stream stopped after {arrived} rows without its end record")
    if counted != arrived:
        raise IncompleteStream(f"the stream's end record counts {counted} rows but {arrived} arrived")
    return pa.Table.from_batches(batches, schema=reader.schema)


def _run(body: dict) -> RunInfo:
    return RunInfo(id=int(body["id"]), name=body["name"], config=body.get("config") or {}, status=body["status"])


def _layer(body: dict) -> LayerInfo:
    return LayerInfo(
        id=int(body["id"]), run_id=int(body["run_id"]), name=body["name"], dim=int(body["dim"]), kind=body["kind"]
    )


def _floats(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if value is None else value for value in values], dtype=np.float64)


def _items_arrow(items: list[dict]) -> bytes | None:
    """The items as one Arrow body when their keys are numpy arrays of one width, else None (sent as JSON)."""
    if not items or not all(isinstance(item.get("key"), np.ndarray) and set(item) <= _ITEM_FIELDS for item in items):
        return None
    keys = [item["key"] for item in items]
    if len({key.shape for key in keys}) != 1 or keys[0].ndim != 1:
        return None
    present = {name for item in items for name in item}
    metas = [item.get("meta") for item in items] if "meta" in present else None
    return items_to_arrow(
        np.stack(keys),
        labels=[item.get("label") for item in items] if "label" in present else None,
        values=[item.get("value") for item in items] if "value" in present else None,
        confidences=[item.get("confidence") for item in items] if "confidence" in present else None,
        metas=metas,
    )
