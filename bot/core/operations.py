"""What a result can become besides a re-roll or a variation: an upscale, a zoom out, a pan, a remix;
and a new job that starts from an image the user uploads.

Each is a job with a parent (the result it starts from, found and checked as for a variation, see
`FollowUps.find_parent`), charged by the images it makes, and shown in the history. The pixel work
(the 2x resize, the canvas with its border mask) is done here with Pillow (`bot.core.imageops`), in a
worker thread, and the inputs are stored with the job, so the backend gets plain image-to-image and
inpainting requests and a restarted bot can run the job again. An upscale larger than the backend's
largest side is made in tiles at run time (`bot.core.tiling`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Mapping
from typing import Any

from bot.config import CoreConfig
from bot.core import imageops, validate
from bot.core.api import Actor, BadParameters, JobKind, JobView, NotFound, Place
from bot.core.followups import FollowUps, image_index
from bot.core.imageops import Canvas
from bot.core.models import ImageRow, Job
from bot.core.params import Limits, ParsedPrompt, new_seed, parse_prompt
from bot.core.storage import ImageStorage
from bot.core.submission import Submissions
from bot.core.uploads import prepare_start_image


class Operations:
    def __init__(
        self,
        storage: ImageStorage,
        config: CoreConfig,
        submissions: Submissions,
        followups: FollowUps,
        *,
        rng: random.Random,
        limits: Callable[[str | None], Limits],
    ):
        self.storage = storage
        self.config = config
        self.submissions = submissions
        self.followups = followups
        self.rng = rng
        self.limits = limits

    def _canvas_limits(self, task: str, what: str, parent: Job) -> tuple[int, int]:
        """(largest side, size multiple) of a canvas for the parent's model, after checking it can
        do `task`."""
        limits = self.limits(self.followups.model_of(parent)[0])
        limits.require_task(task, what)
        return min(self.config.bot.max_side, limits.max_side), limits.size_multiple

    # -- an uploaded image to start from ----------------------------------------------------------

    async def image_to_image(
        self,
        actor: Actor,
        place: Place,
        text: str,
        image: bytes,
        options: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        actor, place = validate.actor_and_place(actor, place)
        delivery = validate.delivery(delivery)
        # Before the upload is decoded and stored: a retried event costs one query, not that work.
        existing = await self.submissions.existing(actor, idempotency_key)
        if existing is not None:
            return existing
        bot = self.config.bot
        options = await self.submissions.place_settings.with_defaults(
            place, text, options, aspect_ratio=False
        )
        limits, chosen = await self.submissions.choose(place, text, options)
        limits.require_task("img2img", "image-to-image")
        parsed = parse_prompt(
            text, options, bot, limits=limits, rng=self.rng, allow_strength=True, chosen=chosen
        )
        _no_aspect(parsed, "when you start from an image")
        start = await asyncio.to_thread(
            prepare_start_image, image, max_bytes=bot.max_upload_bytes, limits=limits
        )
        key = await self.storage.put(start.image_png)
        parsed = dataclasses.replace(parsed, width=start.width, height=start.height)
        return await self.submissions.submit(
            actor,
            place,
            "imagine",
            parsed,
            idempotency_key,
            delivery,
            task="img2img",
            strength=parsed.strength if parsed.strength is not None else bot.image_strength,
            input_image_key=key,
        )

    # -- operations on a result -------------------------------------------------------------------

    async def upscale(
        self,
        actor: Actor,
        place: Place,
        index: int,
        *,
        job_id: int | None = None,
        message_id: str | None = None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        """Image `index` at twice its size: resized 2x, then image-to-image at `[bot]
        upscale_strength` with its own seed (on `[bot] upscaler_model` when one is configured)."""
        start = await self._start(actor, place, job_id, message_id, idempotency_key, delivery, index)
        if isinstance(start, JobView):
            return start
        actor, place, delivery, parent, source, png = start
        bot = self.config.bot
        _, multiple = self._canvas_limits("img2img", "upscaling (image-to-image)", parent)
        canvas = await asyncio.to_thread(
            imageops.upscale_input, png, max_upscale_side=bot.max_upscale_side, multiple=multiple
        )
        parsed = self._from_parent(parent, canvas, n=1, seed=int(source.seed))
        return await self._submit(
            actor, place, "upscale", parsed, idempotency_key, delivery, parent, source, canvas,
            strength=bot.upscale_strength, detail=f"{imageops.UPSCALE_FACTOR}x",
            model=bot.upscaler_model or None,
        )  # fmt: skip

    async def zoom_out(
        self,
        actor: Actor,
        place: Place,
        factor: float,
        *,
        index: int = 0,
        job_id: int | None = None,
        message_id: str | None = None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        """Image `index` in the middle of a canvas 1.5x or 2x its size, the border painted in."""
        if (
            isinstance(factor, bool)
            or not isinstance(factor, (int, float))
            or factor not in imageops.ZOOM_FACTORS
        ):
            raise BadParameters("factor", f"Zoom out by 1.5x or 2x, not {factor!r}.", factor)
        start = await self._start(actor, place, job_id, message_id, idempotency_key, delivery, index)
        if isinstance(start, JobView):
            return start
        actor, place, delivery, parent, source, png = start
        max_side, multiple = self._canvas_limits("inpaint", "zoom out (inpainting)", parent)
        canvas = await asyncio.to_thread(
            imageops.zoom_out, png, float(factor), max_side=max_side, multiple=multiple
        )
        parsed = self._from_parent(parent, canvas)
        return await self._submit(
            actor, place, "zoom", parsed, idempotency_key, delivery, parent, source, canvas,
            strength=self.config.bot.inpaint_strength, detail=f"{float(factor):g}x",
        )  # fmt: skip

    async def pan(
        self,
        actor: Actor,
        place: Place,
        direction: str,
        *,
        index: int = 0,
        job_id: int | None = None,
        message_id: str | None = None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        """Image `index` extended by half its side in `direction` (left, right, up, down)."""
        if direction not in imageops.DIRECTIONS:
            raise BadParameters("direction", f"Pan left, right, up or down, not {direction!r}.", direction)
        start = await self._start(actor, place, job_id, message_id, idempotency_key, delivery, index)
        if isinstance(start, JobView):
            return start
        actor, place, delivery, parent, source, png = start
        max_side, multiple = self._canvas_limits("inpaint", "pan (inpainting)", parent)
        canvas = await asyncio.to_thread(imageops.pan, png, direction, max_side=max_side, multiple=multiple)
        parsed = self._from_parent(parent, canvas)
        return await self._submit(
            actor, place, "pan", parsed, idempotency_key, delivery, parent, source, canvas,
            strength=self.config.bot.inpaint_strength, detail=direction,
        )  # fmt: skip

    async def remix(
        self,
        actor: Actor,
        place: Place,
        text: str,
        *,
        index: int = 0,
        job_id: int | None = None,
        message_id: str | None = None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None = None,
    ) -> JobView:
        """A variation of image `index` with the prompt and flags edited: `text` is the new prompt
        with its flags (`remix_text(job)` is the parent's, to start the edit from); `--strength`
        sets how far it may stray (default `[bot] variation_strength`). The size is the image's."""
        bot = self.config.bot
        # The remix's text carries the parent's --model and --lora (`remix_text`): kept unless edited.
        limits, chosen = await self.submissions.choose(place, text, None)
        limits.require_task("img2img", "remix (image-to-image)")
        parsed = parse_prompt(
            text, None, bot, limits=limits, rng=self.rng, allow_strength=True, chosen=chosen
        )
        _no_aspect(parsed, "in a remix")
        start = await self._start(actor, place, job_id, message_id, idempotency_key, delivery, index)
        if isinstance(start, JobView):
            return start
        actor, place, delivery, parent, source, _png = start
        parsed = dataclasses.replace(parsed, width=source.width, height=source.height)
        return await self.submissions.submit(
            actor,
            place,
            "remix",
            parsed,
            idempotency_key,
            delivery,
            task="img2img",
            strength=parsed.strength if parsed.strength is not None else bot.variation_strength,
            parent=parent,
            parent_image_index=source.index,
            input_image_key=source.storage_key,
        )

    # -- shared steps -----------------------------------------------------------------------------

    async def _start(
        self,
        actor: Actor,
        place: Place,
        job_id: int | None,
        message_id: str | None,
        idempotency_key: str,
        delivery: Mapping[str, Any] | None,
        index: int,
    ) -> JobView | tuple[Actor, Place, dict[str, Any], Job, ImageRow, bytes]:
        """The checked request and the parent's image, or the job already made with this key."""
        actor, place = validate.actor_and_place(actor, place)
        job_id, message_id = validate.job_refs(job_id, message_id)
        index = image_index(index)
        checked_delivery = validate.delivery(delivery)
        existing = await self.submissions.existing(actor, idempotency_key)
        if existing is not None:
            return existing
        parent = await self.followups.find_parent(actor, place, job_id, message_id)
        source = await self.followups.source_image(parent, index)
        try:
            png = await self.storage.get(source.storage_key)
        except KeyError:
            raise NotFound(f"Image {index + 1} of job {parent.id} is no longer stored.") from None
        return actor, place, checked_delivery, parent, source, png

    def _from_parent(
        self, parent: Job, canvas: Canvas, *, n: int | None = None, seed: int | None = None
    ) -> ParsedPrompt:
        p = parent.params
        count = int(p["n"]) if n is None else n
        model, loras = self.followups.model_of(parent)
        return ParsedPrompt(
            parent.prompt,
            parent.negative_prompt,
            new_seed(count, self.rng) if seed is None else seed,
            int(p["steps"]),
            count,
            float(p["guidance"]),
            canvas.width,
            canvas.height,
            None,
            model=model,
            loras=loras,
        )

    async def _submit(
        self,
        actor: Actor,
        place: Place,
        kind: JobKind,
        parsed: ParsedPrompt,
        idempotency_key: str,
        delivery: Mapping[str, Any],
        parent: Job,
        source: ImageRow,
        canvas: Canvas,
        *,
        strength: float,
        detail: str,
        model: str | None = None,
    ) -> JobView:
        image_key = await self.storage.put(canvas.image_png)
        mask_key = await self.storage.put(canvas.mask_png) if canvas.mask_png is not None else None
        return await self.submissions.submit(
            actor,
            place,
            kind,
            parsed,
            idempotency_key,
            delivery,
            task="img2img" if mask_key is None else "inpaint",
            strength=strength,
            parent=parent,
            parent_image_index=source.index,
            input_image_key=image_key,
            mask_key=mask_key,
            detail=detail,
            model=model,
        )


def _no_aspect(parsed: ParsedPrompt, where: str) -> None:
    if parsed.aspect_ratio is not None:
        raise BadParameters(
            "ar", f"--ar does not apply {where}: the size follows the image.", parsed.aspect_ratio
        )


def remix_text(job: JobView) -> str:
    """The prompt and flags of `job` as a user would type them: where a remix's edit starts from.
    No --seed (a remix gets a new one unless the user types one) and no --ar (the size is the
    image's)."""
    p = job.params
    parts = [job.prompt]
    if p.n > 1:
        parts.append(f"--n {p.n}")
    parts += [f"--steps {p.steps}", f"--guidance {p.guidance:g}"]
    if p.model:
        parts.append(f"--model {p.model}")
    parts += [f"--lora {lora.name}:{lora.weight:g}" for lora in p.loras]
    if job.negative_prompt:
        parts.append(f"--no {job.negative_prompt}")  # last: --no takes the rest of the text
    return " ".join(parts)
