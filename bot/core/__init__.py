"""The platform-free bot core: users, quotas, jobs, dispatch. Adapters use `bot.core.api` only."""

from bot.core.api import *  # noqa: F403  (the public interface is defined and listed there)
from bot.core.api import __all__  # noqa: F401
