"""Labels in the chat: members confirm the bot's reading of their question, moderators review labels with
/label commands, and every member can /optout, /optin and /forgetme."""
from nonebot import require
from nonebot.plugin import PluginMetadata

require("corefbot.plugins.chatlog")

from .config import Config  # noqa: E402
from . import commands, confirm, privacy  # noqa: E402,F401  (registers the matchers and hooks)

__plugin_meta__ = PluginMetadata(
    name="corefbot labels",
    description="Member confirmation of the resolver's reading, moderator label review (/label), privacy commands.",
    usage="/label [next] | /label <id> a|b|c [rewrite] | /label undo | /label skip | /label show <id> | /label stats "
          "(moderators); /optout, /optin, /forgetme (everyone). Members answer the bot's prompts with 1, 2 or 3.",
    type="application",
    config=Config,
    supported_adapters={"~onebot.v11"},
)

__all__ = ["Config"]
