"""One cog per feature; each module's `setup(bot)` adds its cog."""
