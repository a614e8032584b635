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

CREATE VIEW pgdist.nodes AS
SELECT n.node_id,
       n.host,
       n.port,
       n.role,
       n.status,
       0::bigint AS shard_count,
       n.last_heartbeat,
       n.consecutive_failures
FROM pgdist.node n
ORDER BY n.node_id;
COMMENT ON VIEW pgdist.nodes IS 'One row per node: address, role, health status and shard count.';
