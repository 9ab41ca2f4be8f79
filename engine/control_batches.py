"""What kind of control a batch of control jobs is (engine/controls.py stores one kind per
device's job), for doors that must check a request against the control it names: a Cancel is
authorised by the control type it names, which must then be the batch's own."""
from __future__ import annotations

from sqlalchemy import select

from cimhes.engine.controls import REQUEST_KIND, ControlJobRecord
from cimhes.engine.jobs import JobRecord, JobRequestRecord
from cimhes.engine.store import Store


def kinds_of_batch(store: Store, batch_id: str) -> set[str] | None:
    """The control kinds (ControlKind values) of batch ``batch_id``'s jobs; None when no control
    batch has that id."""
    with store._session() as session:  # noqa: SLF001
        request_id = session.scalar(select(JobRequestRecord.id).where(
            JobRequestRecord.key == batch_id, JobRequestRecord.kind == REQUEST_KIND))
        if request_id is None:
            return None
        return set(session.scalars(
            select(ControlJobRecord.kind).join(JobRecord, JobRecord.id == ControlJobRecord.job_id)
            .where(JobRecord.request_id == request_id).distinct()))
