"""Record every group message (and the bot's own) into SQLite, merged and filtered as they arrive."""
from nonebot import require
from nonebot.plugin import PluginMetadata

require("nonebot_plugin_localstore")

from .config import Config  # noqa: E402
from . import health  # noqa: E402,F401  (/corefbot health; bounded log lines)
from .handlers import get_recorder  # noqa: E402
from .recorder import Recorder, Update  # noqa: E402

__plugin_meta__ = PluginMetadata(
    name="corefbot chatlog",
    description="Records group messages into SQLite; applies the concat rule and the question filter live.",
    usage="Runs by itself. Other plugins: get_recorder().add_listener(async fn(Update)); "
          "await get_recorder().call(fn(store)) for database work on the single writer.",
    type="application",
    config=Config,
    supported_adapters=None,
)

__all__ = ["Config", "Recorder", "Update", "get_recorder"]
