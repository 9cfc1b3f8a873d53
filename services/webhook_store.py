"""Which Polar webhook deliveries the bot already took (table `polar_webhook_deliveries`,
migration 020_polar_webhooks.sql), so that a repeated delivery changes nothing.

`first_time` is the `seen` callable of `services.polar_webhooks.make_handler`; `forget` its undo,
for a delivery whose handling failed and that Polar will send again.
"""
from __future__ import annotations

from services.db import Database


class WebhookDeliveries:
    def __init__(self, db: Database):
        self.db = db
        self.s = db.schema  # a validated identifier (services.config)

    async def first_time(self, webhook_id: str, event_type: str | None = None) -> bool:
        """Record the delivery; True if it was not recorded before. One statement, so two
        replicas receiving the same delivery at once get one True between them."""
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                f"INSERT INTO {self.s}.polar_webhook_deliveries (webhook_id, event_type) VALUES (%s, %s)"
                " ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id", (webhook_id, event_type))
            return await cur.fetchone() is not None

    async def forget(self, webhook_id: str) -> None:
        async with self.db.pool.connection() as conn:
            await conn.execute(f"DELETE FROM {self.s}.polar_webhook_deliveries WHERE webhook_id = %s", (webhook_id,))
