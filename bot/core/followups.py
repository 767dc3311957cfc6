"""Jobs that start from a result: re-rolls, variations, and the reactions that ask for them.

Who may start one from whose result is decided here (`find_parent`); the submission itself is
`Submissions.submit`, with the parent's prompt and parameters and a new seed. The other operations
on a result (upscale, zoom out, pan, remix) are in `bot.core.operations`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import select

from bot.backends.base import LoraSpec, Task
from bot.config import CoreConfig
from bot.core import validate
from bot.core.api import REACTION_ACTIONS, Actor, BadParameters, JobView, NotFound, Place
from bot.core.db import Database
from bot.core.models import ImageRow, Job, User
from bot.core.params import Limits, ParsedPrompt, new_seed
from bot.core.submission import Submissions

# Clients differ on the emoji variation selector (U+FE0F) and Slack sends ":name:" or "name".
_REACTIONS = {key.replace("\ufe0f", ""): value for key, value in REACTION_ACTIONS.items()}


class FollowUps:
    def __init__(
        self,
        db: Database,
        config: CoreConfig,
        submissions: Submissions,
        *,
        rng: random.Random,
        limits: Callable[[str | None], Limits],
    ):
        self.db = db
        self.config = config
        self.submissions = submissions
        self.rng = rng
        self.limits = limits

    async def react(
        self,
        actor: Actor,
        place: Place,
        message_id: str,
        emoji: str,
        *,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView | None:
        actor, place = validate.actor_and_place(actor, place)
        message_id = validate.ident("message", message_id, max_chars=validate.MAX_MESSAGE_ID_CHARS)
        if not isinstance(emoji, str):
            return None
        action = _REACTIONS.get(emoji.strip().strip(":").replace("\ufe0f", ""))
        if action is None:
            return None
        delivery = validate.delivery(delivery)
        if (await self.submissions.place_settings.rules(place)).private:
            # A reaction is public and has no interaction to answer privately: in private mode
            # only commands and buttons start jobs.
            return None
        existing = await self.submissions.existing(actor, idempotency_key)
        if existing is not None:
            return existing
        try:
            parent = await self.find_parent(actor, place, None, message_id)
        except NotFound:
            return None
        kind, index = action
        if kind == "reroll":
            return await self._reroll(actor, place, parent, idempotency_key, delivery)
        assert index is not None, f"REACTION_ACTIONS[{emoji!r}] is a variation without an image"
        return await self._variation(actor, place, parent, index, idempotency_key, delivery)

    async def reroll(
        self,
        actor: Actor,
        place: Place,
        *,
        job_id: int | None = None,
        message_id: str | None = None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        actor, place = validate.actor_and_place(actor, place)
        job_id, message_id = validate.job_refs(job_id, message_id)
        delivery = validate.delivery(delivery)
        existing = await self.submissions.existing(actor, idempotency_key)
        if existing is not None:
            return existing
        parent = await self.find_parent(actor, place, job_id, message_id)
        return await self._reroll(actor, place, parent, idempotency_key, delivery)

    async def variation(
        self,
        actor: Actor,
        place: Place,
        index: int,
        *,
        job_id: int | None = None,
        message_id: str | None = None,
        subtle: bool = False,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        actor, place = validate.actor_and_place(actor, place)
        job_id, message_id = validate.job_refs(job_id, message_id)
        index = image_index(index)
        delivery = validate.delivery(delivery)
        existing = await self.submissions.existing(actor, idempotency_key)
        if existing is not None:
            return existing
        parent = await self.find_parent(actor, place, job_id, message_id)
        return await self._variation(actor, place, parent, index, idempotency_key, delivery, subtle=subtle)

    async def find_parent(
        self, actor: Actor, place: Place, job_id: int | None, message_id: str | None
    ) -> Job:
        """The succeeded job a follow-up starts from, if `actor` may use it (see `may_use`). By the
        message showing its result when given (a reaction, a button), else (or when that message
        shows no result, e.g. one recorded late) by job id. Anything else is NotFound, as for a job
        that does not exist: a number guessed in one place must not tell what someone else asked
        for in another."""
        if job_id is None and message_id is None:
            raise ValueError("give job_id or message_id")
        row = None
        via_message = False
        async with self.db.read() as s:
            if message_id is not None:
                query = (
                    select(Job, User)
                    .join(User, Job.user_id == User.id)
                    .where(Job.platform == actor.platform, Job.result_message_id == message_id)
                    .order_by(Job.id.desc())
                    .limit(1)
                )
                row = (await s.execute(query)).first()
                via_message = row is not None
            if row is None and job_id is not None:
                query = select(Job, User).join(User, Job.user_id == User.id).where(Job.id == job_id)
                row = (await s.execute(query)).first()
        if row is None or not may_use(row[0], row[1], actor, place, via_message=via_message):
            raise NotFound("That is not an image result I know about.")
        job = row[0]
        if job.state != "succeeded":
            raise BadParameters("job", f"Job {job.id} has no images yet (it is {job.state}).", job.id)
        return job

    async def _reroll(
        self, actor: Actor, place: Place, parent: Job, idempotency_key: str, delivery: Mapping[str, Any]
    ) -> JobView:
        p = parent.params
        n = int(p["n"])
        model, loras = self.model_of(parent)
        parsed = ParsedPrompt(
            parent.prompt,
            parent.negative_prompt,
            new_seed(n, self.rng),
            int(p["steps"]),
            n,
            float(p["guidance"]),
            int(p["width"]),
            int(p["height"]),
            p.get("aspect_ratio"),
            model=model,
            loras=loras,
        )
        task: Task = p.get("task", "txt2img")
        return await self.submissions.submit(
            actor,
            place,
            "reroll",
            parsed,
            idempotency_key,
            delivery,
            task=task,
            strength=p.get("strength"),
            parent=parent,
            input_image_key=parent.input_image_key,
            mask_key=parent.mask_key,
            detail=p.get("detail"),
        )

    def model_of(self, parent: Job) -> tuple[str | None, tuple[LoraSpec, ...]]:
        """The parent's model and LoRAs, which a follow-up keeps (refused if no longer offered)."""
        model, loras = job_model(parent)
        self.submissions.choices.known(model, loras)
        return model, loras

    async def source_image(self, parent: Job, index: int) -> ImageRow:
        """Image `index` (0-based) of a succeeded job, or BadParameters naming what it has."""
        async with self.db.read() as s:
            images = (
                (
                    await s.execute(
                        select(ImageRow).where(ImageRow.job_id == parent.id).order_by(ImageRow.index)
                    )
                )
                .scalars()
                .all()
            )
        if not 0 <= index < len(images):
            raise BadParameters(
                "image", f"Image {index + 1} does not exist: that result has {len(images)} image(s).", index
            )
        return images[index]

    async def _variation(
        self,
        actor: Actor,
        place: Place,
        parent: Job,
        index: int,
        idempotency_key: str,
        delivery: Mapping[str, Any],
        *,
        subtle: bool = False,
    ) -> JobView:
        model, loras = self.model_of(parent)
        self.limits(model).require_task("img2img", "variations (image-to-image)")
        source = await self.source_image(parent, index)
        bot = self.config.bot
        p = parent.params
        n = int(p["n"])
        parsed = ParsedPrompt(
            parent.prompt,
            parent.negative_prompt,
            new_seed(n, self.rng),
            int(p["steps"]),
            n,
            float(p["guidance"]),
            source.width,
            source.height,
            p.get("aspect_ratio"),
            model=model,
            loras=loras,
        )
        return await self.submissions.submit(
            actor,
            place,
            "variation",
            parsed,
            idempotency_key,
            delivery,
            task="img2img",
            strength=bot.subtle_variation_strength if subtle else bot.variation_strength,
            parent=parent,
            parent_image_index=index,
            input_image_key=source.storage_key,
            detail="subtle" if subtle else "strong",
        )


def job_model(job: Job) -> tuple[str | None, tuple[LoraSpec, ...]]:
    """A job row's model and LoRAs (rows from before the column kept an upscaler in params)."""
    loras = tuple(LoraSpec(str(x["name"]), float(x["weight"])) for x in job.loras or ())
    return job.model or job.params.get("model"), loras


def image_index(index: Any) -> int:
    """A 0-based image index from an adapter: a whole number (its range is the parent's to say)."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise BadParameters("image", f"The image number must be a whole number, got {index!r}.", index)
    return index


def may_use(job: Job, owner: User, actor: Actor, place: Place, *, via_message: bool) -> bool:
    """May `actor`, acting in `place`, start a job from `job`'s result?

    - it is on the actor's platform (a web user never reaches a Discord job);
    - its owner may always use it;
    - by result message, so by a reaction on it: anyone in the channel where it is shown (they see
      its prompt and images anyway); a result shown in no channel (the playground's) is its
      owner's alone;
    - by job id: besides the owner, only an admin acting in the job's guild/workspace.
    """
    if job.platform != actor.platform:
        return False
    if owner.platform_user_id == actor.user_id:
        return True
    shown_in = job.result_channel_id or job.channel_id
    if via_message and shown_in is not None and shown_in == place.channel_id:
        return True
    return actor.is_admin and job.guild_id == place.guild_id
