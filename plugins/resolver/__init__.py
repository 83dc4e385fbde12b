"""Resolve the group's questions, forward them to the assistant, and reply with the answer."""
from nonebot import require
from nonebot.plugin import PluginMetadata

require("corefbot.plugins.chatlog")

from .config import Config  # noqa: E402
from .handlers import get_service  # noqa: E402
from .service import ResolutionListener, ResolverService  # noqa: E402

__plugin_meta__ = PluginMetadata(
    name="corefbot resolver",
    description="Decides whether a question leans on the chat's context, rewrites it to stand alone, forwards it "
                "to the group's assistant through a durable outbox and replies with the answer.",
    usage="Runs by itself (COREFBOT_REPLY_MODE=mention: answer when @-mentioned or quoted). Other plugins: "
          "get_service().add_resolution_listener(async fn(update, resolution)); "
          "await get_service().swap_model(gguf_path) to hot-swap the served model.",
    type="application",
    config=Config,
    supported_adapters={"~onebot.v11"},
)

__all__ = ["Config", "ResolutionListener", "ResolverService", "get_service"]
