"""Start the resolver service with the driver, wire it to the chatlog recorder, post replies."""
from __future__ import annotations

import asyncio

import nonebot
from nonebot import get_driver, get_plugin_config, logger

from corefbot.models.serve.question_llm import parse_band
from corefbot.plugins.chatlog import get_recorder
from corefbot.plugins.chatlog.capture import platform_of
from corefbot.plugins.chatlog.handlers import config as chatlog_config

from .config import Config
from .forward import AssistantClient
from .outbox import OutboxItem, RetryPolicy
from .service import BotUnavailable, RateLimiter, ResolverService, ServiceOptions

config = get_plugin_config(Config)


def get_service() -> ResolverService:
    """The resolver service. It exists as soon as the plugin is imported (listeners may be added before the
    driver starts); it serves from the driver's start-up, after the chatlog recorder's."""
    return _service


def backend_name(cfg: Config) -> str:
    return cfg.corefbot_resolver or ("llama-cpp" if cfg.corefbot_model_path else "rules")


def load_configured_resolver(cfg: Config):
    """The configured resolver; a missing or corrupt model (or bad URL) is logged and replaced by rules."""
    from corefbot.models.serve.resolver import load_resolver

    resolver = load_resolver(
        backend_name(cfg), fallback=True, model_path=str(cfg.corefbot_model_path) if cfg.corefbot_model_path else None,
        url=cfg.corefbot_resolver_url, http_model=cfg.corefbot_resolver_model, api_key=cfg.corefbot_resolver_key,
        n_threads=cfg.corefbot_resolver_threads, gate_path=cfg.corefbot_gate_path, decide_by=cfg.corefbot_decide_by,
        weigh_gate=cfg.corefbot_weigh_gate)
    if resolver.fallback_reason:
        logger.error(f"corefbot resolver: {resolver.fallback_reason}; serving with the rules backend instead")
    return resolver


def swap_loader(cfg: Config):
    """How a hot swap (a nightly promotion, a rollback) loads a GGUF: with the same threads and gate as at start.
    No fallback here: a model that fails to load leaves the serving one in place."""
    from corefbot.models.serve.resolver import load_resolver

    def load(gguf_path: str):
        return load_resolver("llama-cpp", model_path=gguf_path, n_threads=cfg.corefbot_resolver_threads,
                             gate_path=cfg.corefbot_gate_path, decide_by=cfg.corefbot_decide_by,
                             weigh_gate=cfg.corefbot_weigh_gate)
    return load


def make_assistant(cfg: Config) -> AssistantClient | None:
    if not cfg.corefbot_assistant_url:
        return None
    return AssistantClient(cfg.corefbot_assistant_url, api=cfg.corefbot_assistant_api,
                           model=cfg.corefbot_assistant_model, key=cfg.corefbot_assistant_key,
                           system=cfg.corefbot_assistant_system, timeout_s=cfg.corefbot_assistant_timeout_s)


def options(cfg: Config) -> ServiceOptions:
    return ServiceOptions(
        reply_mode=cfg.corefbot_reply_mode, resolve_all=cfg.corefbot_resolve_all,
        max_background=cfg.corefbot_resolve_backlog, window=chatlog_config.corefbot_window,
        history=cfg.corefbot_assistant_history, show_query=cfg.corefbot_show_query,
        max_answer_chars=cfg.corefbot_max_answer_chars, concurrency=cfg.corefbot_assistant_concurrency,
        rate=RateLimiter(cfg.corefbot_rate_limit, cfg.corefbot_rate_period_s),
        retry=RetryPolicy(cfg.corefbot_retry_base_s, cfg.corefbot_retry_max_s, cfg.corefbot_max_attempts,
                          cfg.corefbot_outbox_max_age_s),
        keep_finished_s=cfg.corefbot_outbox_keep_days * 86400,
        question_llm=cfg.corefbot_question_llm, question_band=parse_band(cfg.corefbot_question_band),
        question_threshold=chatlog_config.corefbot_question_threshold, question_llm_url=cfg.corefbot_question_llm_url,
        question_llm_model=cfg.corefbot_question_llm_model, question_llm_key=cfg.corefbot_question_llm_key,
        max_query_chars=cfg.corefbot_max_query_chars, unavailable_reply=cfg.corefbot_unavailable_reply)


async def post_reply(item: OutboxItem, text: str) -> str | None:
    """Post ``text`` into the item's group quoting the asker's line and @-mentioning them (OneBot v11)."""
    from nonebot.adapters.onebot.v11 import Bot as V11Bot, MessageSegment

    bots = nonebot.get_bots()
    bot = bots.get(item.self_id) or next((b for b in bots.values() if platform_of(b) == item.platform), None)
    if bot is None:
        raise BotUnavailable(f"no {item.platform} bot connected to answer in group {item.group}")
    if not isinstance(bot, V11Bot):
        raise RuntimeError(f"replies are implemented for OneBot v11 only, not {item.platform}")
    message = MessageSegment.text(text)
    if item.asker.isdigit():
        message = MessageSegment.at(int(item.asker)) + MessageSegment.text(" " + text)
    if item.reply_to.isdigit():
        message = MessageSegment.reply(int(item.reply_to)) + message
    result = await bot.send_group_msg(group_id=int(item.group), message=message)
    return str(result.get("message_id")) if isinstance(result, dict) and result.get("message_id") is not None else None


# Made at import so other plugins can add listeners at any time; the model is loaded when the driver starts.
_service = ResolverService(None, lambda fn: get_recorder().call(fn), assistant=make_assistant(config),
                           post_reply=post_reply, bot_ids=lambda: set(nonebot.get_bots()), options=options(config),
                           model_loader=swap_loader(config))
driver = get_driver()


@driver.on_startup
async def _start() -> None:
    recorder = get_recorder()
    resolver = await asyncio.to_thread(load_configured_resolver, config)
    await _service.start(resolver)
    recorder.add_listener(_service.on_update, wants=_service.wants_update)
    logger.info(f"corefbot resolver: backend {resolver.name}, reply mode {config.corefbot_reply_mode}, "
                f"assistant {config.corefbot_assistant_url or 'none'} ({config.corefbot_assistant_api})")


@driver.on_shutdown
async def _stop() -> None:
    await _service.stop()
