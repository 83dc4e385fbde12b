"""What leaves the chat log: a member who asks to be forgotten, and label traffic (commands, answers,
prompts) that is about the data, not part of the conversation."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from corefbot.pipeline.store import Store


FORGOTTEN = "forgotten"


@dataclass(frozen=True, slots=True)
class Forgotten:
    messages: int  # the member's own
    bot_messages: int  # the bot's messages quoting, mentioning or prompting them
    rows: dict[str, int]  # other rows deleted, per table


def forget_member(store: Store, platform: str, sender: str) -> Forgotten:
    """Delete everything stored of one member: their messages and merged queries, every row keyed by one
    of their questions in any table with a ``merged_id`` column (labels, audit, decisions, outbox, prompts…),
    the bot's messages that quoted, @-mentioned or prompted them, and their name as labeler elsewhere."""
    conn = store.db.conn
    own_ids = {(g, mid) for g, mid in conn.execute(
        "SELECT group_id, message_id FROM messages WHERE platform = ? AND sender = ?", (platform, sender))}
    prompted = {(g, mid) for g, mid in conn.execute(
        "SELECT group_id, prompt_message_id FROM label_prompts WHERE platform = ? AND author = ? "
        "AND prompt_message_id IS NOT NULL", (platform, sender))}
    bot_keys: set[str] = set()
    for key, group, message_id, reply_to, mentions in conn.execute(
            "SELECT key, group_id, message_id, reply_to, mentions FROM messages WHERE platform = ? AND from_self = 1",
            (platform,)):
        if ((group, reply_to) in own_ids or (group, message_id) in prompted
                or (mentions and sender in json.loads(mentions))):
            bot_keys.add(key)
    bot_runs = {mid for mid, ids in conn.execute(
        "SELECT id, message_ids FROM merged WHERE platform = ? AND from_self = 1", (platform,))
        if bot_keys.intersection(json.loads(ids))} if bot_keys else set()
    rows = store.delete_merged(bot_runs)
    with conn:
        n = conn.execute("DELETE FROM label_prompts WHERE platform = ? AND author = ?", (platform, sender)).rowcount
        if n:
            rows["label_prompts"] = rows.get("label_prompts", 0) + n
        for table in ("labels", "label_audit"):
            conn.execute(f"UPDATE [{table}] SET labeler = ? WHERE labeler = ?", (FORGOTTEN, sender))
        conn.executemany("DELETE FROM messages WHERE key = ?", [(k,) for k in bot_keys])
    own_runs = [r[0] for r in conn.execute("SELECT id FROM merged WHERE platform = ? AND sender = ?", (platform, sender))]
    for table, n in store.delete_merged(own_runs).items():
        rows[table] = rows.get(table, 0) + n
    with conn:
        messages = conn.execute("DELETE FROM messages WHERE platform = ? AND sender = ?", (platform, sender)).rowcount
    return Forgotten(messages, len(bot_keys), rows)


def purge_messages(store: Store, keys: Iterable[str]) -> set[tuple[str, str]]:
    """Take label traffic (commands, 1/2/3 answers, the bot's prompts and item displays) out of the chat log:
    it is about the data, not part of the conversation, and an item display repeats other members' words.
    A merged run that held such a message is rebuilt from its remaining messages (or deleted when none
    remain). Returns the (platform, group) pairs touched, whose open run the live merger must reload."""
    conn = store.db.conn
    touched: set[tuple[str, str]] = set()
    with conn:
        for key in keys:
            row = conn.execute("SELECT platform, group_id FROM messages WHERE key = ?", (key,)).fetchone()
            if row is None:
                continue
            platform, group = row
            touched.add((platform, group))
            conn.execute("DELETE FROM messages WHERE key = ?", (key,))
            runs = conn.execute("SELECT id, message_ids FROM merged WHERE platform = ? AND group_id = ? "
                                "AND message_ids LIKE ?", (platform, group, f'%{json.dumps(key)}%')).fetchall()
            for run_id, ids_json in runs:
                ids = [k for k in json.loads(ids_json) if k != key]
                rest = [conn.execute("SELECT text, timestamp FROM messages WHERE key = ?", (k,)).fetchone() for k in ids]
                rest = [r for r in rest if r is not None]
                if not rest:
                    conn.execute("DELETE FROM merged WHERE id = ?", (run_id,))
                    continue
                conn.execute("UPDATE merged SET text = ?, timestamp = ?, end_timestamp = ?, message_ids = ? WHERE id = ?",
                             ("\n".join(r[0] for r in rest), rest[0][1], rest[-1][1], json.dumps(ids), run_id))
    return touched
