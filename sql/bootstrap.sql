-- pgdist bootstrap catalog. The schema "pgdist" itself comes from pgdist.control.
-- Catalog tables are extension configuration tables, so pg_dump of the coordinator keeps them.

CREATE TABLE pgdist.node (
    node_id              serial PRIMARY KEY,
    host                 text NOT NULL,
    port                 int NOT NULL CHECK (port BETWEEN 1 AND 65535),
    role                 text NOT NULL DEFAULT 'primary' CHECK (role IN ('primary', 'replica')),
    -- for a replica: the primary it streams from (matched by system identifier)
    primary_node_id      int REFERENCES pgdist.node (node_id),
    system_identifier    bigint NOT NULL,
    status               text NOT NULL DEFAULT 'up' CHECK (status IN ('up', 'down', 'draining')),
    last_heartbeat       timestamptz,
    consecutive_failures int NOT NULL DEFAULT 0,
    added_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (host, port),
    CHECK ((role = 'replica') = (primary_node_id IS NOT NULL))
);
COMMENT ON TABLE pgdist.node IS 'Nodes of the cluster (workers and their replicas); see the view pgdist.nodes.';
SELECT pg_catalog.pg_extension_config_dump('pgdist.node', '');
SELECT pg_catalog.pg_extension_config_dump('pgdist.node_node_id_seq', '');

-- Co-location groups: tables in one group have the same shard count, method, distribution
-- column type and placements, so shard i of each lives on the same nodes.
CREATE TABLE pgdist.colocation_group (
    colocation_id      serial PRIMARY KEY,
    method             text NOT NULL CHECK (method IN ('hash', 'range', 'reference')),
    shard_count        int NOT NULL CHECK (shard_count > 0),
    distribution_type  regtype,
    replication_factor int NOT NULL CHECK (replication_factor > 0)
);
SELECT pg_catalog.pg_extension_config_dump('pgdist.colocation_group', '');
SELECT pg_catalog.pg_extension_config_dump('pgdist.colocation_group_colocation_id_seq', '');

-- Distributed and reference tables (the coordinator keeps an empty shell of each).
CREATE TABLE pgdist.dist_table (
    table_oid           regclass PRIMARY KEY,
    method              text NOT NULL CHECK (method IN ('hash', 'range', 'reference')),
    distribution_column text,
    colocation_id       int NOT NULL REFERENCES pgdist.colocation_group (colocation_id),
    -- Rows in all its shards, as the nodes last estimated them (NULL: not asked yet); the
    -- planner sizes scans and joins by it.
    row_estimate        float8,
    CHECK ((method = 'reference') = (distribution_column IS NULL))
);
SELECT pg_catalog.pg_extension_config_dump('pgdist.dist_table', '');

CREATE SEQUENCE pgdist.shard_id_seq START 102008;
SELECT pg_catalog.pg_extension_config_dump('pgdist.shard_id_seq', '');

-- Shards: for hash tables [min_value, max_value] is the inclusive int4 hash range; for range
-- tables [min_value, max_value) in the column type's text form, NULL meaning unbounded.
CREATE TABLE pgdist.shard (
    shard_id    bigint PRIMARY KEY DEFAULT nextval('pgdist.shard_id_seq'),
    table_oid   regclass NOT NULL REFERENCES pgdist.dist_table (table_oid) ON DELETE CASCADE,
    shard_index int NOT NULL,
    min_value   text,
    max_value   text,
    UNIQUE (table_oid, shard_index)
);
SELECT pg_catalog.pg_extension_config_dump('pgdist.shard', '');

-- Where each shard lives.
CREATE TABLE pgdist.placement (
    placement_id bigserial PRIMARY KEY,
    shard_id     bigint NOT NULL REFERENCES pgdist.shard (shard_id) ON DELETE CASCADE,
    node_id      int NOT NULL REFERENCES pgdist.node (node_id),
    state        text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'inactive', 'to_delete')),
    UNIQUE (shard_id, node_id)
);
CREATE INDEX ON pgdist.placement (node_id);
SELECT pg_catalog.pg_extension_config_dump('pgdist.placement', '');
SELECT pg_catalog.pg_extension_config_dump('pgdist.placement_placement_id_seq', '');

-- Commit decisions of two-phase commits, written in the coordinator's local transaction;
-- recovery commits prepared transactions that have a record and rolls back the others.
CREATE TABLE pgdist.transaction_decision (
    gid        text PRIMARY KEY,
    node_id    int NOT NULL,
    decided_at timestamptz NOT NULL DEFAULT now()
);

CREATE VIEW pgdist.nodes AS
SELECT n.node_id,
       n.host,
       n.port,
       n.role,
       n.status,
       (SELECT count(*) FROM pgdist.placement p WHERE p.node_id = n.node_id) AS shard_count,
       n.last_heartbeat,
       n.consecutive_failures
FROM pgdist.node n
ORDER BY n.node_id;
COMMENT ON VIEW pgdist.nodes IS 'One row per node: address, role, health status and shard count.';
