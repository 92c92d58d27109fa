-- Version 2: webhook notifications. One row per (receiver, event id): the body exactly as it is
-- sent (its signature is computed over these bytes), its delivery state (pending, delivered,
-- failed: given up) and the outcome of the latest attempt. The unique (receiver, event_id) makes
-- an enqueue of the same event twice (a rescan after a restart) store one delivery.

CREATE TABLE IF NOT EXISTS notifications (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, receiver TEXT NOT NULL, event TEXT NOT NULL, body TEXT NOT NULL, created REAL NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL, last_attempt REAL, last_status INTEGER, last_error TEXT, delivered_at REAL);
CREATE UNIQUE INDEX IF NOT EXISTS notifications_once ON notifications (receiver, event_id);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (state, next_attempt);
