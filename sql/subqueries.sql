-- The value of a subquery that the coordinator computes before a write runs on the workers
-- (planner/coordinator_subqueries.rs): `query` is `SELECT (<subquery>)`, `SELECT EXISTS (…)`
-- or `SELECT ARRAY(…)`, so PostgreSQL's own rules apply (NULL for no row, an error for more
-- than one); `hint` is a NULL of the result type.
CREATE FUNCTION pgdist.subquery_value(query text, hint anyelement) RETURNS anyelement
LANGUAGE plpgsql STABLE AS $$
DECLARE
    result ALIAS FOR $0;
BEGIN
    EXECUTE query INTO result;
    RETURN result;
END
$$;
