"""plugins/resolver settings: the area's model lives in :mod:`corefbot.plugins.common.settings` (the CLI reads it
without starting NoneBot); this is the name ``get_plugin_config`` is given."""
from corefbot.plugins.common.settings import ResolverSettings as Config, AssistantApi, ReplyMode

__all__ = ["Config", "AssistantApi", "ReplyMode"]
