"""Kernel records of a run: written per task and layer, read back, and ranked (top-k kernels)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from app import plasticity
from app.deps import Conn, Id, Reader, Writer
from app.schemas import KernelRecordList, KernelRecordSetOut, KernelRecordsIn, KernelRecordsWritten, TopKernelsOut

router = APIRouter(prefix="/v1/runs/{run_id}/kernel-records", tags=["kernel records"])

INT32 = 2**31 - 1


@router.post("", status_code=201, response_model=KernelRecordsWritten)
def write_kernel_records(body: KernelRecordsIn, run_id: Id, principal: Writer, conn: Conn) -> KernelRecordsWritten:
    """Stores one task's record set of one layer; writing the same (task, layer) again replaces it."""
    stored = plasticity.write(
        conn,
        principal.project_id,
        run_id,
        task=body.task,
        layer=body.layer,
        change=body.change,
        importance=body.importance,
        intervals=body.intervals,
    )
    return KernelRecordsWritten(
        task=stored.task, layer=stored.layer, kernels=len(stored.change), intervals=stored.intervals
    )


@router.get("", response_model=KernelRecordList)
def list_kernel_records(
    run_id: Id,
    principal: Reader,
    conn: Conn,
    task: Annotated[int | None, Query(ge=0, le=INT32)] = None,
    layer: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
) -> KernelRecordList:
    found = plasticity.read(conn, principal.project_id, run_id, task=task, layer=layer)
    return KernelRecordList(records=[KernelRecordSetOut(**asdict(record)) for record in found])


@router.get("/top", response_model=TopKernelsOut)
def top_kernels(
    run_id: Id,
    principal: Reader,
    conn: Conn,
    task: Annotated[int, Query(ge=0, le=INT32)],
    layer: Annotated[str, Query(min_length=1, max_length=200)],
    k: Annotated[int | None, Query(ge=1, le=INT32, description="How many kernels (at most all of them).")] = None,
    ratio: Annotated[
        float | None,
        Query(gt=0, le=1, allow_inf_nan=False, description="Or a share of the layer's kernels, rounded up."),
    ] = None,
    by: Annotated[Literal["change", "importance"], Query()] = "importance",
) -> TopKernelsOut:
    """The layer's top kernels for the task: give exactly one of `k` and `ratio`."""
    found = plasticity.top(conn, principal.project_id, run_id, task=task, layer=layer, by=by, k=k, ratio=ratio)
    return TopKernelsOut(**asdict(found))
