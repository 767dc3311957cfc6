"""Which model and LoRAs a job runs on, and who may pick what where.

The servers say which models exist, with each one's capabilities and LoRAs (`ModelCatalog`, kept
current by `bot.core.model_watch.ModelWatch` from their `GET /v1/models`). A guild's/workspace's
admins pick its default model and may allow only some models and LoRAs (`ModelSettings` rows; the
changes are audited). At submit time `ModelChoices.choose` turns the user's `--model`/`--lora` into
what the job runs on, or refuses naming what is available, before anything is queued; the job's
`Limits` then come from that model's capabilities.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.backends.base import LoraSpec, ModelCapabilities, ModelInfo
from bot.core import validate
from bot.core.api import Actor, BadParameters, ModelEntry, ModelListing, Place
from bot.core.audit import Audit
from bot.core.db import Database
from bot.core.models import ModelSettings
from bot.core.params import NAME_RE, ModelRequest

# Names shown in one refusal: a chat message, not a catalogue (the listing command has them all).
MAX_NAMES_SHOWN = 15
# Allow-list entries: the servers' models and LoRAs, with room to spare; a typo guard.
MAX_ALLOWED = 200


class ModelCatalog:
    """The models the servers offer, by name (names compare without case: users type "sdxl")."""

    def __init__(self, models: Sequence[ModelInfo] = ()):
        self.models = tuple(models)
        self._by_key = {m.name.casefold(): m for m in self.models}

    def __bool__(self) -> bool:
        return bool(self.models)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelCatalog) and self.models == other.models

    __hash__ = None  # type: ignore[assignment]  # compared by value, never a dict key

    def get(self, name: str | None) -> ModelInfo | None:
        return None if name is None else self._by_key.get(name.casefold())

    @property
    def default(self) -> ModelInfo | None:
        return next((m for m in self.models if m.default), self.models[0] if self.models else None)

    def lora_models(self, lora: str) -> list[str]:
        """The models a LoRA works with."""
        key = lora.casefold()
        return [m.name for m in self.models if any(x.casefold() == key for x in m.loras)]


@dataclass(frozen=True)
class GuildModels:
    """A guild's/workspace's settings (all empty where none are set)."""

    default_model: str | None = None
    allowed_models: tuple[str, ...] = ()
    allowed_loras: tuple[str, ...] = ()

    def model_allowed(self, name: str) -> bool:
        return not self.allowed_models or name.casefold() in {m.casefold() for m in self.allowed_models}

    def lora_allowed(self, name: str) -> bool:
        return not self.allowed_loras or name.casefold() in {x.casefold() for x in self.allowed_loras}


@dataclass(frozen=True)
class Choice:
    """What a job runs on: `model` None is the servers' default (capabilities from /health)."""

    model: str | None
    loras: tuple[LoraSpec, ...]
    capabilities: ModelCapabilities | None


def _names(names: Sequence[str]) -> str:
    shown = list(names[:MAX_NAMES_SHOWN])
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "") if shown else "none"


def choose(
    request: ModelRequest,
    catalog: ModelCatalog,
    settings: GuildModels,
    default_capabilities: ModelCapabilities | None,
) -> Choice:
    """The model and LoRAs for `request` in a place with `settings`, or BadParameters naming the
    flag and what is available instead."""
    if not catalog:
        if request.model or request.loras:
            flag = "model" if request.model else "lora"
            raise BadParameters(
                flag,
                f"--{flag} can't be used here: the inference server offers one model and no LoRAs.",
                request.model or request.loras[0].name,
            )
        return Choice(None, (), default_capabilities)
    allowed = [m.name for m in catalog.models if settings.model_allowed(m.name)]
    if request.model is not None:
        info = catalog.get(request.model)
        if info is None:
            raise BadParameters(
                "model", f"There is no model {request.model!r}. Models: {_names(allowed)}.", request.model
            )
        if not settings.model_allowed(info.name):
            raise BadParameters(
                "model",
                f"The model {info.name} is not allowed here. Allowed here: {_names(allowed)}.",
                request.model,
            )
    else:
        info = _default_here(catalog, settings)
        if info is None:
            raise BadParameters("model", "None of the models allowed here is offered by the servers now.")
        if info is catalog.default and not request.loras and settings.default_model is None:
            # Nothing asked and nothing set: the job runs on whatever each server's default is.
            return Choice(None, (), default_capabilities)
    loras = []
    for lora in request.loras:
        loras.append(_check_lora(lora, info, catalog, settings))
    return Choice(info.name, tuple(loras), info.capabilities)


def _default_here(catalog: ModelCatalog, settings: GuildModels) -> ModelInfo | None:
    """The guild's default when the servers still have it, else the servers' default when allowed,
    else the first allowed model."""
    for candidate in (catalog.get(settings.default_model), catalog.default):
        if candidate is not None and settings.model_allowed(candidate.name):
            return candidate
    return next((m for m in catalog.models if settings.model_allowed(m.name)), None)


def _check_lora(lora: LoraSpec, model: ModelInfo, catalog: ModelCatalog, settings: GuildModels) -> LoraSpec:
    usable = [x for x in model.loras if settings.lora_allowed(x)]
    name = next((x for x in model.loras if x.casefold() == lora.name.casefold()), None)
    if name is None:
        others = catalog.lora_models(lora.name)
        if others:
            raise BadParameters(
                "lora",
                f"The LoRA {lora.name} doesn't work with {model.name} (it is for {_names(others)}). "
                f"LoRAs for {model.name}: {_names(usable)}.",
                lora.name,
            )
        raise BadParameters(
            "lora", f"There is no LoRA {lora.name!r}. LoRAs for {model.name}: {_names(usable)}.", lora.name
        )
    if not settings.lora_allowed(name):
        raise BadParameters(
            "lora", f"The LoRA {name} is not allowed here. Allowed here: {_names(usable)}.", lora.name
        )
    return dataclasses.replace(lora, name=name)


class ModelChoices:
    """The core's part for models: choices at submit time, listings, and the admins' settings."""

    def __init__(
        self,
        db: Database,
        audit: Audit,
        *,
        catalog: Callable[[], ModelCatalog],
        default_capabilities: Callable[[], ModelCapabilities | None],
        clock: Callable[[], dt.datetime],
    ):
        self.db = db
        self.audit = audit
        self.catalog = catalog
        self.default_capabilities = default_capabilities
        self.clock = clock

    async def settings(self, place: Place) -> GuildModels:
        if place.guild_id is None:
            return GuildModels()
        async with self.db.read() as s:
            row = await self._row(s, place.platform, place.guild_id)
        return _settings_of(row)

    async def choose(self, place: Place, request: ModelRequest) -> Choice:
        catalog = self.catalog()
        # Servers without a registry offer no choice: no settings to read on the submit path.
        settings = await self.settings(place) if catalog else GuildModels()
        return choose(request, catalog, settings, self.default_capabilities())

    def known(self, model: str | None, loras: Sequence[LoraSpec]) -> None:
        """A follow-up's parent's model and LoRAs must still be offered: refuse now rather than fail
        on the server (only when the servers list their models)."""
        catalog = self.catalog()
        if not catalog or model is None:
            return
        info = catalog.get(model)
        if info is None:
            raise BadParameters(
                "model",
                f"The model {model} of that image is no longer offered. "
                f"Models: {_names([m.name for m in catalog.models])}.",
                model,
            )
        missing = [x.name for x in loras if x.name not in info.loras]
        if missing:
            raise BadParameters(
                "lora", f"The LoRA {missing[0]} of that image is no longer offered.", missing[0]
            )

    def capabilities(self, model: str | None) -> ModelCapabilities | None:
        """The capabilities a job on `model` is checked against (the default's for None or a model
        no longer listed: the server then says what it thinks)."""
        info = self.catalog().get(model)
        return info.capabilities if info is not None else self.default_capabilities()

    async def listing(self, place: Place) -> ModelListing:
        return self._listing(self.catalog(), await self.settings(place))

    def _listing(self, catalog: ModelCatalog, settings: GuildModels) -> ModelListing:
        if not catalog:
            return ModelListing((), choice=False)
        default = _default_here(catalog, settings)
        entries = tuple(
            ModelEntry(
                name=m.name,
                label=m.capabilities.label if m.capabilities is not None else m.family or m.name,
                family=m.family,
                loras=tuple(x for x in m.loras if settings.lora_allowed(x)),
                default=m is default,
                loaded=m.loaded,
            )
            for m in catalog.models
            if settings.model_allowed(m.name)
        )
        entries = tuple(sorted(entries, key=lambda e: not e.default))
        restricted = bool(settings.allowed_models or settings.allowed_loras)
        return ModelListing(entries, choice=True, restricted=restricted)

    # -- admin -------------------------------------------------------------------------------------

    async def set_default_model(self, actor: Actor, place: Place, model: str | None) -> ModelListing:
        actor, place = validate.actor_and_place(actor, place)
        guild_id = self._guild(place)
        await self.audit.require_admin(actor, "set_default_model", f"guild:{guild_id}")
        catalog = self._catalog_for_settings()
        name = None
        if model is not None and str(model).strip():
            info = self._model(catalog, str(model).strip())
            name = info.name
        async with self.db.session() as s:
            row = await self._row_for_update(s, actor.platform, guild_id)
            if name is not None and not _settings_of(row).model_allowed(name):
                raise BadParameters(
                    "model", f"{name} is not among the models allowed here; allow it first.", name
                )
            row.default_model = name
            row.updated_at = self.clock()
            self.audit.record(s, actor, "set_default_model", f"guild:{guild_id}", {"model": name})
            settings = _settings_of(row)
        return self._listing(catalog, settings)

    async def allow_models(self, actor: Actor, place: Place, models: Sequence[str]) -> ModelListing:
        actor, place = validate.actor_and_place(actor, place)
        guild_id = self._guild(place)
        await self.audit.require_admin(actor, "allow_models", f"guild:{guild_id}")
        catalog = self._catalog_for_settings()
        names = _dedupe(self._model(catalog, m).name for m in _words("models", models))
        async with self.db.session() as s:
            row = await self._row_for_update(s, actor.platform, guild_id)
            if (
                names
                and row.default_model
                and row.default_model.casefold() not in {n.casefold() for n in names}
            ):
                raise BadParameters(
                    "models",
                    f"The default model here, {row.default_model}, would not be allowed: "
                    "include it, or change the default first.",
                    names,
                )
            row.allowed_models = names
            row.updated_at = self.clock()
            self.audit.record(s, actor, "allow_models", f"guild:{guild_id}", {"models": names})
            settings = _settings_of(row)
        return self._listing(catalog, settings)

    async def allow_loras(self, actor: Actor, place: Place, loras: Sequence[str]) -> ModelListing:
        actor, place = validate.actor_and_place(actor, place)
        guild_id = self._guild(place)
        await self.audit.require_admin(actor, "allow_loras", f"guild:{guild_id}")
        catalog = self._catalog_for_settings()
        every = {x.casefold(): x for m in catalog.models for x in m.loras}
        names = []
        for word in _words("loras", loras):
            found = every.get(word.casefold())
            if found is None:
                raise BadParameters(
                    "loras", f"There is no LoRA {word!r}. LoRAs: {_names(sorted(every.values()))}.", word
                )
            names.append(found)
        names = _dedupe(names)
        async with self.db.session() as s:
            row = await self._row_for_update(s, actor.platform, guild_id)
            row.allowed_loras = names
            row.updated_at = self.clock()
            self.audit.record(s, actor, "allow_loras", f"guild:{guild_id}", {"loras": names})
            settings = _settings_of(row)
        return self._listing(catalog, settings)

    # -- internals ---------------------------------------------------------------------------------

    @staticmethod
    def _guild(place: Place) -> str:
        if place.guild_id is None:
            raise BadParameters(
                "guild", "Model settings belong to a server or workspace: use this command in one."
            )
        return place.guild_id

    def _catalog_for_settings(self) -> ModelCatalog:
        catalog = self.catalog()
        if not catalog:
            raise BadParameters(
                "model", "The inference server offers one model and no LoRAs: there is nothing to choose."
            )
        return catalog

    @staticmethod
    def _model(catalog: ModelCatalog, name: str) -> ModelInfo:
        info = catalog.get(name)
        if info is None:
            raise BadParameters(
                "model",
                f"There is no model {name!r}. Models: {_names([m.name for m in catalog.models])}.",
                name,
            )
        return info

    async def _row(self, s: AsyncSession, platform: str, guild_id: str) -> ModelSettings | None:
        return (
            await s.execute(
                select(ModelSettings).where(
                    ModelSettings.platform == platform, ModelSettings.guild_id == guild_id
                )
            )
        ).scalar_one_or_none()

    async def _row_for_update(self, s: AsyncSession, platform: str, guild_id: str) -> ModelSettings:
        row = await self._row(s, platform, guild_id)
        if row is None:
            row = ModelSettings(
                platform=platform,
                guild_id=guild_id,
                default_model=None,
                allowed_models=[],
                allowed_loras=[],
                updated_at=self.clock(),
            )
            s.add(row)
        return row


def _settings_of(row: ModelSettings | None) -> GuildModels:
    if row is None:
        return GuildModels()
    return GuildModels(row.default_model, tuple(row.allowed_models or ()), tuple(row.allowed_loras or ()))


def _words(fld: str, names: Sequence[str]) -> list[str]:
    """Names from an adapter: a list, or one string of names separated by commas or spaces."""
    if isinstance(names, str):
        names = names.replace(",", " ").split()
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise BadParameters(fld, f"Give the {fld} as a list of names.", names)
    words = [n.strip() for n in names if n.strip()]
    if len(words) > MAX_ALLOWED:
        raise BadParameters(fld, f"At most {MAX_ALLOWED} {fld} in one list.", len(words))
    for word in words:
        if not NAME_RE.fullmatch(word):
            raise BadParameters(fld, f"{word[:60]!r} is not a name of {fld}.", word)
    return words


def _dedupe(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


__all__ = ["Choice", "GuildModels", "ModelCatalog", "ModelChoices", "choose"]
