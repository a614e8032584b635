-- Partial aggregates for aggregate pushdown. For every built-in aggregate that PostgreSQL can
-- combine (the ones parallel query splits), pgdist.partial_<aggregate oid>(same arguments)
-- returns the aggregate's transition state for the rows it saw — serialized to bytea when the
-- state type is internal. Workers compute these per shard; the coordinator's Agg node combines
-- and finalizes them (AGGSPLIT_FINAL_DESERIAL), exactly as for a parallel aggregate.
-- Built-in oids are the same on every node of one PostgreSQL major version.
DO $pgdist$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT a.aggfnoid::oid AS fn,
               a.aggtransfn::regproc AS sfunc,
               format_type(a.aggtranstype, NULL) AS stype,
               a.agginitval,
               a.aggtranstype = 'internal'::regtype AS internal,
               a.aggserialfn::regproc AS serialfn,
               pg_get_function_identity_arguments(a.aggfnoid) AS args
        FROM pg_aggregate a
        WHERE a.aggkind = 'n' AND a.aggcombinefn <> 0 AND a.aggfnoid < 16384
          AND (a.aggtranstype <> 'internal'::regtype OR a.aggserialfn <> 0)
    LOOP
        BEGIN
            EXECUTE format('CREATE AGGREGATE pgdist.%I(%s) (SFUNC = %s, STYPE = %s%s%s)',
                           'partial_' || r.fn,
                           CASE WHEN r.args = '' THEN '*' ELSE r.args END,
                           r.sfunc, r.stype,
                           CASE WHEN r.agginitval IS NOT NULL THEN format(', INITCOND = %L', r.agginitval) ELSE '' END,
                           CASE WHEN r.internal THEN format(', FINALFUNC = %s', r.serialfn) ELSE '' END);
        EXCEPTION WHEN others THEN
            NULL; -- not expressible as a plain aggregate: that aggregate is simply not pushed down
        END;
    END LOOP;
END
$pgdist$;
