//! Subqueries of a write that the coordinator computes first, when the write could not run on
//! the workers with them inside.
//!
//! An uncorrelated subquery of an UPDATE or DELETE — `SET v = (SELECT max(w) FROM other)`,
//! `WHERE x > (SELECT avg(x) FROM t)`, `WHERE EXISTS (…)`, `WHERE k IN (SELECT …)` — has one
//! value for the whole statement. It becomes a call of `pgdist.subquery_value('SELECT (…)',
//! NULL::type)` (`EXISTS (…)`, `ARRAY(…)` for the other kinds; `k IN (…)` becomes
//! `k = ANY(ARRAY(…))`, which has the same NULL semantics), which the coordinator evaluates
//! once at execution like any other value it computes (`with_coordinator_values`); the
//! workers get the result as a literal. As in PostgreSQL, the subquery sees the data as it
//! was when the statement started.

use std::ffi::CString;

use pgrx::{pg_sys, PgList};

use crate::planner::shippable::has_param;

/// Replaces the uncorrelated subqueries in the SET list and WHERE clause of `query` (the
/// statement itself, not its subqueries); false when there was none.
pub unsafe fn compute_first(query: *mut pg_sys::Query) -> bool {
    // SAFETY: query is a private copy of a valid statement; nodes are replaced in place.
    unsafe {
        if !(*query).cteList.is_null() {
            // A subquery could name the statement's WITH queries, which its text lacks.
            return false;
        }
        let Some(function) = subquery_value_function() else {
            return false;
        };
        let mut changed = false;
        for entry in PgList::<pg_sys::TargetEntry>::from_pg((*query).targetList).iter_ptr() {
            (*entry).expr = replace((*entry).expr.cast(), function, &mut changed).cast();
        }
        let jointree = (*query).jointree;
        (*jointree).quals = replace((*jointree).quals, function, &mut changed);
        changed
    }
}

/// `node` with its uncorrelated subqueries replaced (walking through AND / OR / NOT and other
/// expressions, not into subqueries).
unsafe fn replace(
    node: *mut pg_sys::Node,
    function: pg_sys::Oid,
    changed: &mut bool,
) -> *mut pg_sys::Node {
    struct Context {
        function: pg_sys::Oid,
        changed: bool,
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn mutate(
        node: *mut pg_sys::Node,
        context: *mut std::ffi::c_void,
    ) -> *mut pg_sys::Node {
        if node.is_null() {
            return node;
        }
        // SAFETY: node is a valid expression node; context is the Context we passed.
        unsafe {
            let context = &mut *context.cast::<Context>();
            if (*node).type_ == pg_sys::NodeTag::T_SubLink {
                if let Some(value) = computed_first(node.cast(), context.function) {
                    context.changed = true;
                    return value;
                }
                return node;
            }
            pg_sys::expression_tree_mutator(
                node,
                Some(crate::planner::shippable::as_mutator(mutate)),
                (context as *mut Context).cast(),
            )
        }
    }
    let mut context = Context {
        function,
        changed: false,
    };
    // SAFETY: the mutator copies what it changes.
    let result = unsafe { mutate(node, (&raw mut context).cast()) };
    *changed |= context.changed;
    result
}

/// The expression that computes `sublink` on the coordinator, if it is uncorrelated and of a
/// kind that has one value.
unsafe fn computed_first(
    sublink: *mut pg_sys::SubLink,
    function: pg_sys::Oid,
) -> Option<*mut pg_sys::Node> {
    // SAFETY: a SubLink of the statement; its subselect is an analysed Query.
    unsafe {
        let sub = (*sublink).subselect.cast::<pg_sys::Query>();
        // Correlated, or using the statement's `$n` (which its text could not carry).
        if pg_sys::contain_vars_of_level(sub.cast(), 1) || has_param(sub.cast(), |_| true) {
            return None;
        }
        let first_column = || {
            let entry = PgList::<pg_sys::TargetEntry>::from_pg((*sub).targetList)
                .iter_ptr()
                .find(|e| !(**e).resjunk)?;
            Some(pg_sys::exprType((*entry).expr.cast()))
        };
        let text = subquery_text(sub);
        match (*sublink).subLinkType {
            pg_sys::SubLinkType::EXPR_SUBLINK => {
                let type_oid = first_column()?;
                Some(call(function, &format!("SELECT ({text})"), type_oid))
            }
            pg_sys::SubLinkType::EXISTS_SUBLINK => Some(call(
                function,
                &format!("SELECT EXISTS ({text})"),
                pg_sys::BOOLOID,
            )),
            pg_sys::SubLinkType::ARRAY_SUBLINK => {
                let array_type = pg_sys::get_array_type(first_column()?);
                (array_type != pg_sys::InvalidOid)
                    .then(|| call(function, &format!("SELECT ARRAY({text})"), array_type))
            }
            pg_sys::SubLinkType::ANY_SUBLINK | pg_sys::SubLinkType::ALL_SUBLINK => {
                // `x op ANY|ALL (subquery)` with one column: `x op ANY|ALL (ARRAY(subquery))`.
                let test = (*sublink).testexpr;
                if test.is_null() || (*test).type_ != pg_sys::NodeTag::T_OpExpr {
                    return None;
                }
                let op = test.cast::<pg_sys::OpExpr>();
                let args = PgList::<pg_sys::Node>::from_pg((*op).args);
                let (left, right) = (args.get_ptr(0)?, args.get_ptr(1)?);
                if (*right).type_ != pg_sys::NodeTag::T_Param
                    || has_param(left, |kind| kind == pg_sys::ParamKind::PARAM_SUBLINK)
                {
                    return None;
                }
                let array_type = pg_sys::get_array_type(pg_sys::exprType(right));
                if array_type == pg_sys::InvalidOid {
                    return None;
                }
                let array = call(function, &format!("SELECT ARRAY({text})"), array_type);
                let any = (*sublink).subLinkType == pg_sys::SubLinkType::ANY_SUBLINK;
                Some(over_array(op, left, array, any))
            }
            _ => None,
        }
    }
}

/// `<left> op ANY|ALL (<array>)`, with the operator of `op`.
pub(crate) unsafe fn over_array(
    op: *mut pg_sys::OpExpr,
    left: *mut pg_sys::Node,
    array: *mut pg_sys::Node,
    any: bool,
) -> *mut pg_sys::Node {
    // SAFETY: builds a new node in the current memory context around valid ones.
    unsafe {
        let scalar = pg_sys::palloc0(std::mem::size_of::<pg_sys::ScalarArrayOpExpr>())
            .cast::<pg_sys::ScalarArrayOpExpr>();
        (*scalar).xpr.type_ = pg_sys::NodeTag::T_ScalarArrayOpExpr;
        (*scalar).opno = (*op).opno;
        (*scalar).opfuncid = pg_sys::get_opcode((*op).opno);
        (*scalar).useOr = any;
        (*scalar).inputcollid = (*op).inputcollid;
        let mut list = PgList::<pg_sys::Node>::new();
        list.push(left);
        list.push(array);
        (*scalar).args = list.into_pg();
        (*scalar).location = -1;
        scalar.cast()
    }
}

/// `expr` with its uncorrelated subqueries replaced by values the coordinator computes first
/// (as in [`compute_first`]).
pub unsafe fn computed_first_in(expr: *mut pg_sys::Node) -> *mut pg_sys::Node {
    // SAFETY: expr is a valid expression; the replacement copies what it changes.
    unsafe {
        match subquery_value_function() {
            Some(function) => replace(expr, function, &mut false),
            None => expr,
        }
    }
}

/// `pgdist.subquery_value('<query>', NULL::<type_oid>)`.
unsafe fn call(function: pg_sys::Oid, query: &str, type_oid: pg_sys::Oid) -> *mut pg_sys::Node {
    // SAFETY: builds nodes in the current (planner) memory context.
    unsafe {
        let text = CString::new(query).unwrap_or_default();
        let query_const = pg_sys::makeConst(
            pg_sys::TEXTOID,
            -1,
            pg_sys::DEFAULT_COLLATION_OID,
            -1,
            pg_sys::Datum::from(pg_sys::cstring_to_text(text.as_ptr())),
            false,
            false,
        );
        let collation = pg_sys::get_typcollation(type_oid);
        let hint = pg_sys::makeNullConst(type_oid, -1, collation);
        let mut args = PgList::<pg_sys::Node>::new();
        args.push(query_const.cast());
        args.push(hint.cast());
        pg_sys::makeFuncExpr(
            function,
            type_oid,
            args.into_pg(),
            collation,
            pg_sys::DEFAULT_COLLATION_OID,
            pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
        )
        .cast()
    }
}

/// The subquery as SQL that runs anywhere on the coordinator: names schema-qualified.
unsafe fn subquery_text(sub: *mut pg_sys::Query) -> String {
    // SAFETY: deparses a copy of a valid analysed query.
    unsafe {
        let copy = pg_sys::copyObjectImpl(sub.cast()).cast::<pg_sys::Query>();
        crate::planner::modify_pushdown::qualified_sql(copy)
    }
}

/// The oid of `pgdist.subquery_value(text, anyelement)`.
unsafe fn subquery_value_function() -> Option<pg_sys::Oid> {
    // SAFETY: a catalog lookup; missing_ok returns InvalidOid instead of raising.
    unsafe {
        let mut names = PgList::<pg_sys::Node>::new();
        names.push(pg_sys::makeString(c"pgdist".as_ptr().cast_mut()).cast());
        names.push(pg_sys::makeString(c"subquery_value".as_ptr().cast_mut()).cast());
        let mut types = [pg_sys::TEXTOID, pg_sys::ANYELEMENTOID];
        let oid = pg_sys::LookupFuncName(names.into_pg(), 2, types.as_mut_ptr(), true);
        (oid != pg_sys::InvalidOid).then_some(oid)
    }
}
