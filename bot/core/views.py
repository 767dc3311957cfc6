"""Job rows as adapters see them: the one place a `Job` row becomes a `JobView`."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, TypeVar, cast

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.backends.base import LoraSpec
from bot.core.api import ImageInfo, JobKind, JobParams, JobState, JobView
from bot.core.models import ImageRow, Job, User

# A job's columns as attributes: a `Job`, a Core row of the jobs table, or a row just inserted (a
# SimpleNamespace of the INSERT's values and its id).
JobColumns = Job | SimpleNamespace | Any


async def image_infos(s: AsyncSession, job_id: int) -> tuple[ImageInfo, ...]:
    rows = (
        (await s.execute(select(ImageRow).where(ImageRow.job_id == job_id).order_by(ImageRow.index)))
        .scalars()
        .all()
    )
    return tuple(
        ImageInfo(r.index, r.seed, r.storage_key, r.sha256, r.size_bytes, r.width, r.height) for r in rows
    )


async def job_view(
    s: AsyncSession,
    job: Job,
    user: User | None = None,
    *,
    created: bool = True,
    images: tuple[ImageInfo, ...] | None = None,
) -> JobView:
    """The view of `job` (its owner `user` is read when not given; its images too, unless the
    caller knows them: `()` for a job that has none yet)."""
    if user is None:
        user = await s.get(User, job.user_id)
        assert user is not None, f"job {job.id} has no user row"  # a foreign key guarantees one
    if images is None:
        images = await image_infos(s, job.id)
    return view_of(job, user.platform_user_id, user.display_name, created=created, images=images)


T = TypeVar("T")


def _frozen(cls: type[T], **values: Any) -> T:
    """An instance of the frozen dataclass `cls` from every one of its fields' values, made without
    its `__init__`: a frozen dataclass's `__init__` sets each field through `object.__setattr__`,
    which made a JobView and its JobParams (38 fields) cost 10 of the 12 microseconds of a view, and
    a submit batch builds one per submission. The instance is the same (tests/core/
    test_submit_prep.py compares it with the constructor's); `view_of` passes every field."""
    made = object.__new__(cls)
    made.__dict__.update(values)
    return made


def view_of(
    job: JobColumns,
    owner_id: str,
    owner_name: str,
    *,
    created: bool = True,
    images: tuple[ImageInfo, ...] = (),
) -> JobView:
    """The view of `job`, whose owner and images the caller knows (no database read). `job` may be
    a row just inserted, with the columns as attributes, or a Core row of the jobs table."""
    p = job.params
    return _frozen(
        JobView,
        id=job.id,
        # The columns hold only these values: the core writes them, from these literals.
        kind=cast(JobKind, job.kind),
        state=cast(JobState, job.state),
        platform=job.platform,
        user_id=owner_id,
        display_name=owner_name,
        guild_id=job.guild_id,
        channel_id=job.channel_id,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        params=_frozen(
            JobParams,
            width=int(p["width"]),
            height=int(p["height"]),
            steps=int(p["steps"]),
            guidance=float(p["guidance"]),
            n=int(p["n"]),
            seed=int(job.seed),
            seeds=tuple(int(x) for x in job.seeds),
            strength=p.get("strength"),
            aspect_ratio=p.get("aspect_ratio"),
            task=str(p.get("task") or "txt2img"),
            detail=p.get("detail"),
            # Rows from before the model column kept an upscaler model in params.
            model=job.model or p.get("model"),
            loras=tuple(LoraSpec(str(x["name"]), float(x["weight"])) for x in job.loras or ()),
        ),
        parent_id=job.parent_job_id,
        parent_image_index=job.parent_image_index,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        result_message_id=job.result_message_id,
        delivery=dict(job.delivery or {}),
        images=images,
        attempts=job.attempts,
        created=created,
        private=bool(p.get("private")),
        position=None,
        delivery_attempt=0,
    )
