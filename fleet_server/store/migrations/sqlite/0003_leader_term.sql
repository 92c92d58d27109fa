-- The leadership term (fencing token): one row, incremented each time a server takes the leadership.
-- Every rollout write carries the writer's term and is refused when the stored term is newer.
CREATE TABLE IF NOT EXISTS leader_term (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    term INTEGER NOT NULL,
    holder TEXT,
    since REAL
);
INSERT OR IGNORE INTO leader_term (id, term) VALUES (1, 0);
