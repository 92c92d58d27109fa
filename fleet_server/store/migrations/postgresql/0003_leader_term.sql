-- The leadership term (fencing token): one row, incremented each time a replica takes the leader
-- lock. Every rollout write carries the writer's term and is refused when the stored term is newer.
CREATE TABLE IF NOT EXISTS leader_term (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    term BIGINT NOT NULL,
    holder TEXT,
    since DOUBLE PRECISION
);
INSERT INTO leader_term (id, term) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
