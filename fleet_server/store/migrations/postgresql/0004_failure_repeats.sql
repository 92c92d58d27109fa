-- How often in a row a device's syncs ended with the same failure for the same commit, and when the
-- last of them ended: from the status's repeat_count and last_seen (null while the last sync did not fail).
ALTER TABLE devices ADD COLUMN IF NOT EXISTS repeat_count INTEGER;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS repeat_last_seen DOUBLE PRECISION;
