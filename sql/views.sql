-- Views over the catalog plus live numbers from the nodes (created after the functions).

CREATE VIEW pgdist.shards AS
WITH stats AS (SELECT * FROM pgdist.shard_statistics())
SELECT s.shard_id,
       s.table_oid AS table_name,
       pgdist.shard_name(s.table_oid, s.shard_id) AS shard_name,
       p.node_id,
       n.host,
       n.port,
       s.min_value,
       s.max_value,
       st.row_estimate,
       st.bytes,
       p.state
FROM pgdist.shard s
JOIN pgdist.placement p USING (shard_id)
JOIN pgdist.node n USING (node_id)
LEFT JOIN stats st ON st.shard_id = s.shard_id AND st.node_id = p.node_id
ORDER BY s.table_oid::text, s.shard_index, p.node_id;
COMMENT ON VIEW pgdist.shards IS 'One row per shard placement, with its hash or range bounds, row estimate and size on its node.';

CREATE VIEW pgdist.tables AS
WITH stats AS (SELECT * FROM pgdist.shard_statistics())
SELECT t.table_oid AS table_name,
       t.method,
       t.distribution_column,
       (SELECT count(*) FROM pgdist.shard s WHERE s.table_oid = t.table_oid)::int AS shard_count,
       t.colocation_id,
       CASE WHEN t.method = 'reference'
            THEN (SELECT count(*) FROM pgdist.placement p JOIN pgdist.shard s USING (shard_id)
                  WHERE s.table_oid = t.table_oid)::int
            ELSE g.replication_factor END AS replication_factor,
       (SELECT sum(st.bytes) FROM pgdist.shard s JOIN stats st USING (shard_id)
        WHERE s.table_oid = t.table_oid)::bigint AS total_bytes
FROM pgdist.dist_table t
JOIN pgdist.colocation_group g USING (colocation_id)
ORDER BY t.table_oid::text;
COMMENT ON VIEW pgdist.tables IS 'One row per distributed or reference table; total_bytes sums every placement on the nodes.';

CREATE VIEW pgdist.distributed_transactions AS
SELECT coalesce(p.coordinator_pid, a.pid) AS coordinator_pid,
       a.usename,
       a.state AS coordinator_state,
       a.xact_start,
       p.node_id,
       p.remote_pid,
       p.remote_state,
       to_timestamp(p.remote_since) AS remote_since,
       p.remote_wait_event,
       p.prepared_gid
FROM pgdist.distributed_transaction_participants() p
LEFT JOIN pg_catalog.pg_stat_activity a
       ON a.pid = p.coordinator_pid
       OR (p.coordinator_pid IS NULL AND a.backend_xid::text = p.local_xid)
ORDER BY a.xact_start, coordinator_pid, p.node_id, p.remote_pid;
COMMENT ON VIEW pgdist.distributed_transactions IS 'One row per node taking part in an open coordinator transaction (its backend there, or its prepared transaction waiting for COMMIT PREPARED).';

CREATE FUNCTION pgdist.rebalance(strategy text DEFAULT 'by_shard_count', threshold float8 DEFAULT 0.1,
                                 dry_run bool DEFAULT false, relation regclass DEFAULT NULL)
RETURNS TABLE (shard_id bigint, table_name regclass, source_node int, target_node int, bytes bigint)
LANGUAGE sql VOLATILE AS $$
    SELECT m.shard_id, m.table_oid::regclass, m.source_node, m.target_node, m.bytes
    FROM pgdist.rebalance_moves(strategy, threshold, dry_run, relation) m
$$;
COMMENT ON FUNCTION pgdist.rebalance(text, float8, bool, regclass) IS 'Moves shards so that every primary worker holds about as many of each co-location group (only relation''s group when given); returns the moves (planned only with dry_run).';

-- Every role may use pgdist's functions (partial aggregates appear in distributed plans); the
-- catalog tables and views stay readable by their owner, and the administration functions
-- check for a superuser or the table's owner themselves (docs/security.md).
GRANT USAGE ON SCHEMA pgdist TO PUBLIC;
