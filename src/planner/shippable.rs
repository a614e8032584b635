//! Which restriction clauses may run on the workers, and their SQL text.
//!
//! A clause is shipped only when it means the same on a worker: columns of the scanned table,
//! constants, `$n` parameters, and operators / functions that are built into PostgreSQL and
//! IMMUTABLE, under the default (or C / POSIX) collation. Everything else stays on the
//! coordinator as a local filter, which is always correct.

use std::ffi::CStr;

use pgrx::pg_sys;

const C_COLLATION_OID: u32 = 950;
const POSIX_COLLATION_OID: u32 = 951;

pub fn builtin_immutable(funcid: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup by oid.
    builtin_for_everyone(funcid)
        && unsafe { pg_sys::func_volatile(funcid) } == b'i' as std::ffi::c_char
}

/// True for a function (or aggregate, window function) built into PostgreSQL that every role
/// may execute. Fragments run on the workers under pgdist's own login, so only such functions
/// are sent there; any other runs on the coordinator, where PostgreSQL checks EXECUTE.
pub fn builtin_for_everyone(funcid: pg_sys::Oid) -> bool {
    const PUBLIC: pg_sys::Oid = pg_sys::Oid::from_u32(pg_sys::ACL_ID_PUBLIC);
    u32::from(funcid) < pg_sys::FirstNormalObjectId
        // SAFETY: an ACL check of a function by oid for the PUBLIC pseudo-role.
        && unsafe { pg_sys::pg_proc_aclcheck(funcid, PUBLIC, pg_sys::ACL_EXECUTE) }
            == pg_sys::AclResult::ACLCHECK_OK
}

pub fn collation_ok(collation: pg_sys::Oid) -> bool {
    let c = u32::from(collation);
    c == 0
        || collation == pg_sys::DEFAULT_COLLATION_OID
        || c == C_COLLATION_OID
        || c == POSIX_COLLATION_OID
}

unsafe fn all_shippable(list: *mut pg_sys::List) -> bool {
    // SAFETY: list is a List of expression nodes (or NULL, an empty list).
    unsafe {
        pgrx::PgList::<pg_sys::Node>::from_pg(list)
            .iter_ptr()
            .all(|n| shippable(n))
    }
}

/// True when `node` can be evaluated on a worker with the same result.
pub unsafe fn shippable(node: *mut pg_sys::Node) -> bool {
    if node.is_null() {
        return true;
    }
    // SAFETY: node is a valid expression node; each cast follows its tag.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_Var => {
                let var = node.cast::<pg_sys::Var>();
                (*var).varlevelsup == 0 && (*var).varattno > 0
            }
            pg_sys::NodeTag::T_Const => true,
            pg_sys::NodeTag::T_Param => matches!(
                (*node.cast::<pg_sys::Param>()).paramkind,
                pg_sys::ParamKind::PARAM_EXTERN | pg_sys::ParamKind::PARAM_EXEC
            ),
            pg_sys::NodeTag::T_OpExpr
            | pg_sys::NodeTag::T_DistinctExpr
            | pg_sys::NodeTag::T_NullIfExpr => {
                let op = node.cast::<pg_sys::OpExpr>();
                builtin_immutable(pg_sys::get_opcode((*op).opno))
                    && collation_ok((*op).inputcollid)
                    && all_shippable((*op).args)
            }
            pg_sys::NodeTag::T_ScalarArrayOpExpr => {
                let op = node.cast::<pg_sys::ScalarArrayOpExpr>();
                builtin_immutable(pg_sys::get_opcode((*op).opno))
                    && collation_ok((*op).inputcollid)
                    && all_shippable((*op).args)
            }
            pg_sys::NodeTag::T_FuncExpr => {
                let func = node.cast::<pg_sys::FuncExpr>();
                builtin_immutable((*func).funcid)
                    && collation_ok((*func).inputcollid)
                    && all_shippable((*func).args)
            }
            pg_sys::NodeTag::T_BoolExpr => all_shippable((*node.cast::<pg_sys::BoolExpr>()).args),
            pg_sys::NodeTag::T_NullTest => shippable((*node.cast::<pg_sys::NullTest>()).arg.cast()),
            pg_sys::NodeTag::T_BooleanTest => {
                shippable((*node.cast::<pg_sys::BooleanTest>()).arg.cast())
            }
            pg_sys::NodeTag::T_RelabelType => {
                // An explicit COLLATE becomes a RelabelType that deparsing drops: keep it here.
                let relabel = node.cast::<pg_sys::RelabelType>();
                let arg = (*relabel).arg.cast::<pg_sys::Node>();
                (*relabel).resultcollid == pg_sys::exprCollation(arg) && shippable(arg)
            }
            pg_sys::NodeTag::T_ArrayExpr => {
                all_shippable((*node.cast::<pg_sys::ArrayExpr>()).elements)
            }
            pg_sys::NodeTag::T_CoalesceExpr => {
                all_shippable((*node.cast::<pg_sys::CoalesceExpr>()).args)
            }
            pg_sys::NodeTag::T_CaseExpr => {
                let case = node.cast::<pg_sys::CaseExpr>();
                shippable((*case).arg.cast())
                    && all_shippable((*case).args)
                    && shippable((*case).defresult.cast())
            }
            pg_sys::NodeTag::T_CaseWhen => {
                let when = node.cast::<pg_sys::CaseWhen>();
                shippable((*when).expr.cast()) && shippable((*when).result.cast())
            }
            pg_sys::NodeTag::T_CaseTestExpr => true,
            pg_sys::NodeTag::T_Aggref => {
                // Only where a whole aggregate runs on the workers (`aggregate_path.rs`).
                let aggref = node.cast::<pg_sys::Aggref>();
                builtin_for_everyone((*aggref).aggfnoid)
                    && (*aggref).agglevelsup == 0
                    && collation_ok((*aggref).inputcollid)
                    && all_shippable((*aggref).aggdirectargs)
                    && all_shippable((*aggref).args)
                    && shippable((*aggref).aggfilter.cast())
            }
            pg_sys::NodeTag::T_TargetEntry => {
                shippable((*node.cast::<pg_sys::TargetEntry>()).expr.cast())
            }
            pg_sys::NodeTag::T_CoerceToDomain => {
                let coerce = node.cast::<pg_sys::CoerceToDomain>();
                domain_on_workers((*coerce).resulttype) && shippable((*coerce).arg.cast())
            }
            // VALUE in a domain's CHECK constraint (see domain_on_workers).
            pg_sys::NodeTag::T_CoerceToDomainValue => true,
            pg_sys::NodeTag::T_CoerceViaIO => {
                // A cast through text: the same on a worker when both I/O functions are
                // immutable (int to text is; timestamptz to text depends on settings).
                let coerce = node.cast::<pg_sys::CoerceViaIO>();
                let arg = (*coerce).arg.cast::<pg_sys::Node>();
                let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
                pg_sys::getTypeOutputInfo(pg_sys::exprType(arg), &mut output, &mut varlena);
                let (mut input, mut io_param) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
                pg_sys::getTypeInputInfo((*coerce).resulttype, &mut input, &mut io_param);
                builtin_immutable(output)
                    && builtin_immutable(input)
                    && collation_ok((*coerce).resultcollid)
                    && shippable(arg)
            }
            _ => false,
        }
    }
}

/// True for a domain the workers have — the type of a column of a distributed or reference
/// table, created on the workers with it — whose CHECK constraints, and its base domains', can
/// run there: a value coerced to it is checked on the worker as on the coordinator.
unsafe fn domain_on_workers(domain: pg_sys::Oid) -> bool {
    use pgrx::spi::Spi;
    let tables = crate::metadata::oids(
        "SELECT DISTINCT attrelid FROM pg_catalog.pg_attribute
         WHERE atttypid = $1 AND attnum > 0 AND NOT attisdropped",
        domain,
    )
    .unwrap_or_default();
    if !tables
        .into_iter()
        .any(|table| crate::metadata::cache::lookup(table).is_some())
    {
        return false;
    }
    let checks: Option<Vec<String>> = Spi::connect(|client| {
        client
            .select(
                "WITH RECURSIVE chain(t) AS (
                   SELECT $1::oid
                   UNION ALL
                   SELECT ty.typbasetype FROM pg_catalog.pg_type ty JOIN chain ON ty.oid = chain.t
                   WHERE ty.typtype = 'd')
                 SELECT c.conbin::text FROM pg_catalog.pg_constraint c JOIN chain ON c.contypid = chain.t
                 WHERE c.contype = 'c'",
                None,
                &[domain.into()],
            )?
            .map(|row| row.get::<String>(1))
            .collect::<Result<Option<Vec<_>>, pgrx::spi::Error>>()
    })
    .ok()
    .flatten();
    let Some(checks) = checks else {
        return false;
    };
    checks.iter().all(|check| {
        let Ok(text) = std::ffi::CString::new(check.as_str()) else {
            return false;
        };
        // SAFETY: the text is a node tree PostgreSQL stored (pg_constraint.conbin); the node is
        // allocated in the current memory context and only read.
        unsafe { shippable(pg_sys::stringToNode(text.as_ptr()).cast()) }
    })
}

/// Writes expressions over a Distributed Scan's input as worker SQL: a single table's columns
/// unqualified, a pushed-down join's as `r<rti>.<column>`; collects the executor parameters
/// they use.
pub struct ScanDeparser {
    root: *mut pg_sys::PlannerInfo,
    /// The table and its range-table index; None for a join.
    base: Option<(pg_sys::Oid, u32)>,
    pub exec_params: Vec<(i32, pg_sys::Oid)>,
}

impl ScanDeparser {
    /// For expressions over what `plan` reads.
    pub fn new(root: *mut pg_sys::PlannerInfo, plan: &crate::planner::scan_path::ScanPlan) -> Self {
        ScanDeparser {
            root,
            base: plan
                .from_sql
                .is_empty()
                .then_some((plan.relid, plan.base_rti)),
            exec_params: plan.exec_params.clone(),
        }
    }

    /// The text of `expr`, or None when it cannot run on the workers.
    pub unsafe fn text(&mut self, expr: *mut pg_sys::Node) -> Option<String> {
        // SAFETY: expr is a valid expression of the query being planned.
        unsafe {
            if !shippable(expr) {
                return None;
            }
            let (text, params) = match self.base {
                Some((relid, rti)) => deparse(expr, relid, rti),
                None => deparse_qualified(self.root, expr),
            };
            self.exec_params.extend(params);
            Some(text)
        }
    }

    /// The executor parameters used so far, each once, by id.
    pub fn take_exec_params(self) -> Vec<(i32, pg_sys::Oid)> {
        let mut params = self.exec_params;
        params.sort_unstable_by_key(|(id, _)| *id);
        params.dedup_by_key(|(id, _)| *id);
        params
    }
}

/// `<expr> ASC|DESC NULLS FIRST|LAST` for an ORDER BY item, when the worker sorts the same
/// way: a shippable expression and the type's default `<` or `>`.
pub unsafe fn sort_key_text(
    sql: &mut ScanDeparser,
    clause: *mut pg_sys::SortGroupClause,
    tlist: *mut pg_sys::List,
) -> Option<String> {
    // SAFETY: a SortGroupClause of the query being planned and its target list.
    unsafe {
        let expr = pg_sys::get_sortgroupclause_expr(clause, tlist).cast::<pg_sys::Node>();
        let text = sql.text(expr)?;
        let direction = if is_descending(pg_sys::exprType(expr), (*clause).sortop)? {
            "DESC"
        } else {
            "ASC"
        };
        let nulls = if (*clause).nulls_first {
            "NULLS FIRST"
        } else {
            "NULLS LAST"
        };
        Some(format!("{text} {direction} {nulls}"))
    }
}

/// Whether `sort_operator` is the `>` (true) or the `<` (false) of `type_oid`'s default btree
/// operator class, the only orders a worker's `ASC` / `DESC` reproduce; None for another
/// operator (`ORDER BY … USING`).
pub unsafe fn is_descending(type_oid: pg_sys::Oid, sort_operator: pg_sys::Oid) -> Option<bool> {
    // SAFETY: a type cache lookup.
    unsafe {
        let types = pg_sys::lookup_type_cache(
            type_oid,
            (pg_sys::TYPECACHE_LT_OPR | pg_sys::TYPECACHE_GT_OPR) as i32,
        );
        if sort_operator == pg_sys::InvalidOid {
            None
        } else if sort_operator == (*types).lt_opr {
            Some(false)
        } else if sort_operator == (*types).gt_opr {
            Some(true)
        } else {
            None
        }
    }
}

/// Executor parameters (correlated values, init plans; ids from 0) are written as
/// `$<EXEC_PARAM_BASE + id>`
/// in fragment text, to tell them from the statement's own `$n`.
pub const EXEC_PARAM_BASE: i32 = 100_000;

/// `$<COORDINATOR_VALUE_BASE + i>` stands for the i-th value the coordinator computes at
/// execution (`with_coordinator_values`).
pub const COORDINATOR_VALUE_BASE: i32 = 250_000;

/// `$<BROADCAST_BASE + i>` stands for the i-th column of the tables a join broadcasts
/// (`ScanPlan::broadcasts`): an array of the column's values, read at execution.
pub const BROADCAST_BASE: i32 = 270_000;

/// In the FROM clause of a pushed-down join, `$<RELATION_BASE + rti>` stands for the shard of
/// range-table entry `rti` that a fragment reads; the executor writes the shard's name there.
pub const RELATION_BASE: i32 = 300_000;

/// While deparsing over several relations, `$<COLUMN_BASE + i>` stands for the i-th column
/// reference; replaced by `r<rti>.<column>` before the text leaves `deparse_qualified`.
const COLUMN_BASE: i32 = 200_000;

/// The alias of range-table entry `rti` in pushed-down SQL.
pub fn alias(rti: u32) -> String {
    format!("r{rti}")
}

/// SQL text of `clause` over relation `relid`, which is range-table entry `rti` of the query
/// (column names unqualified), and the executor parameters it uses with their types.
pub unsafe fn deparse(
    clause: *mut pg_sys::Node,
    relid: pg_sys::Oid,
    rti: u32,
) -> (String, Vec<(i32, pg_sys::Oid)>) {
    // SAFETY: clause is a shippable expression over relid; we deparse a copy whose Vars are
    // renumbered to the single-relation context and whose executor Params are renamed; the
    // result is a palloc'd C string.
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        let context = pg_sys::deparse_context_for(name, relid);
        let copy = pg_sys::copyObjectImpl(clause.cast()).cast::<pg_sys::Node>();
        if rti != 1 {
            pg_sys::ChangeVarNodes(copy, rti as i32, 1, 0);
        }
        let mut exec_params: Vec<(i32, pg_sys::Oid)> = Vec::new();
        rename_exec_params(copy, (&raw mut exec_params).cast());
        let text = pg_sys::deparse_expression(copy, context, false, false);
        (
            CStr::from_ptr(text).to_string_lossy().into_owned(),
            exec_params,
        )
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn rename_exec_params(
    node: *mut pg_sys::Node,
    context: *mut std::ffi::c_void,
) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: node belongs to our private copy; context is the Vec we passed.
    unsafe {
        if (*node).type_ == pg_sys::NodeTag::T_Param {
            let param = node.cast::<pg_sys::Param>();
            if (*param).paramkind == pg_sys::ParamKind::PARAM_EXEC {
                (*context.cast::<Vec<(i32, pg_sys::Oid)>>())
                    .push(((*param).paramid, (*param).paramtype));
                (*param).paramkind = pg_sys::ParamKind::PARAM_EXTERN;
                (*param).paramid += EXEC_PARAM_BASE;
            }
            return false;
        }
        pg_sys::expression_tree_walker(node, Some(rename_exec_params), context)
    }
}

struct Qualifying {
    root: *mut pg_sys::PlannerInfo,
    columns: Vec<String>,
    exec_params: Vec<(i32, pg_sys::Oid)>,
}

/// SQL text of the shippable `expr`, whose columns may come from several relations of the
/// query, each written `r<rti>.<column>`; and the executor parameters it uses with their types.
pub unsafe fn deparse_qualified(
    root: *mut pg_sys::PlannerInfo,
    expr: *mut pg_sys::Node,
) -> (String, Vec<(i32, pg_sys::Oid)>) {
    let mut state = Qualifying {
        root,
        columns: Vec::new(),
        exec_params: Vec::new(),
    };
    // SAFETY: the mutator returns a copy in which every Var became a placeholder parameter and
    // every executor parameter a renamed one, so ruleutils needs no relation context; the
    // result is a palloc'd C string.
    let text = unsafe {
        let copy = qualify_columns(expr, (&raw mut state).cast());
        let text = pg_sys::deparse_expression(copy, std::ptr::null_mut(), false, false);
        CStr::from_ptr(text).to_string_lossy().into_owned()
    };
    let text = crate::remote::quote::replace_dollar_refs(&text, |id| {
        let index = usize::try_from(id.checked_sub(COLUMN_BASE)?).ok()?;
        state.columns.get(index).cloned()
    });
    (text, state.exec_params)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn qualify_columns(
    node: *mut pg_sys::Node,
    context: *mut std::ffi::c_void,
) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    // SAFETY: node is a valid expression node; context is the Qualifying we passed; new nodes
    // are palloc'd in the current (planner) memory context.
    unsafe {
        let state = &mut *context.cast::<Qualifying>();
        match (*node).type_ {
            pg_sys::NodeTag::T_Var => {
                let var = node.cast::<pg_sys::Var>();
                let rte = *(*state.root).simple_rte_array.add((*var).varno as usize);
                let name = pg_sys::get_attname((*rte).relid, (*var).varattno, false);
                state.columns.push(format!(
                    "{}.{}",
                    alias((*var).varno as u32),
                    crate::remote::quote::quote_identifier(&CStr::from_ptr(name).to_string_lossy())
                ));
                let param = new_param(
                    pg_sys::ParamKind::PARAM_EXTERN,
                    COLUMN_BASE + state.columns.len() as i32 - 1,
                    (*var).vartype,
                    (*var).vartypmod,
                    (*var).varcollid,
                );
                param.cast()
            }
            pg_sys::NodeTag::T_Param
                if (*node.cast::<pg_sys::Param>()).paramkind == pg_sys::ParamKind::PARAM_EXEC =>
            {
                let exec = node.cast::<pg_sys::Param>();
                state.exec_params.push(((*exec).paramid, (*exec).paramtype));
                new_param(
                    pg_sys::ParamKind::PARAM_EXTERN,
                    EXEC_PARAM_BASE + (*exec).paramid,
                    (*exec).paramtype,
                    (*exec).paramtypmod,
                    (*exec).paramcollid,
                )
                .cast()
            }
            _ => pg_sys::expression_tree_mutator(node, Some(as_mutator(qualify_columns)), context),
        }
    }
}

/// A copy of `expr` in which each largest subexpression that cannot run on the workers but
/// needs no row — `now()`, `current_user`, a user-defined function of constants and
/// parameters — is a placeholder parameter (`$<COORDINATOR_VALUE_BASE + i>`), and those
/// subexpressions, appended to `values`, for the executor to compute once per execution on
/// the coordinator: the same value PostgreSQL's stable functions give every row of a statement.
/// Volatile functions and subqueries are left in place (the result is then not shippable).
pub unsafe fn with_coordinator_values(
    expr: *mut pg_sys::Node,
    values: &mut Vec<*mut pg_sys::Node>,
) -> *mut pg_sys::Node {
    // SAFETY: the mutator copies what it changes; `values` outlives the call.
    unsafe { take_coordinator_values(expr, (values as *mut Vec<*mut pg_sys::Node>).cast()) }
}

/// True when the coordinator can compute `node` once for the whole statement.
unsafe fn computable_without_rows(node: *mut pg_sys::Node) -> bool {
    // SAFETY: node is a valid expression node.
    unsafe {
        let expression = matches!(
            (*node).type_,
            pg_sys::NodeTag::T_FuncExpr
                | pg_sys::NodeTag::T_OpExpr
                | pg_sys::NodeTag::T_DistinctExpr
                | pg_sys::NodeTag::T_NullIfExpr
                | pg_sys::NodeTag::T_ScalarArrayOpExpr
                | pg_sys::NodeTag::T_SQLValueFunction
                | pg_sys::NodeTag::T_CoerceViaIO
                | pg_sys::NodeTag::T_ArrayCoerceExpr
                | pg_sys::NodeTag::T_RelabelType
                | pg_sys::NodeTag::T_CoalesceExpr
                | pg_sys::NodeTag::T_MinMaxExpr
                | pg_sys::NodeTag::T_CaseExpr
                | pg_sys::NodeTag::T_BoolExpr
                | pg_sys::NodeTag::T_ArrayExpr
        );
        if !expression {
            return false;
        }
        let type_oid = pg_sys::exprType(node);
        type_oid != pg_sys::RECORDOID
            && pg_sys::get_typtype(type_oid) != pg_sys::TYPTYPE_PSEUDO as std::ffi::c_char
            && !pg_sys::contain_var_clause(node)
            && !pg_sys::contain_volatile_functions(node)
            && !pg_sys::checkExprHasSubLink(node)
            // (A Var of an outer query, in a subquery, is a row's value too.)
            && !has_node(
                node,
                &[
                    pg_sys::NodeTag::T_CaseTestExpr,
                    pg_sys::NodeTag::T_Aggref,
                    pg_sys::NodeTag::T_Var,
                ],
            )
            && !has_exec_param(node)
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn take_coordinator_values(
    node: *mut pg_sys::Node,
    context: *mut std::ffi::c_void,
) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    // SAFETY: node is a valid expression node; context is the Vec we passed.
    unsafe {
        if shippable(node) {
            return node;
        }
        if computable_without_rows(node) {
            let values = &mut *context.cast::<Vec<*mut pg_sys::Node>>();
            values.push(node);
            return new_param(
                pg_sys::ParamKind::PARAM_EXTERN,
                COORDINATOR_VALUE_BASE + values.len() as i32 - 1,
                pg_sys::exprType(node),
                pg_sys::exprTypmod(node),
                pg_sys::exprCollation(node),
            )
            .cast();
        }
        pg_sys::expression_tree_mutator(node, Some(as_mutator(take_coordinator_values)), context)
    }
}

struct NodeSearch<'a> {
    tags: &'a [pg_sys::NodeTag],
}

/// True when `node` contains a node with one of `tags`.
pub(crate) unsafe fn has_node(node: *mut pg_sys::Node, tags: &[pg_sys::NodeTag]) -> bool {
    let mut search = NodeSearch { tags };
    // SAFETY: the walker only reads the tree; the context is `search`.
    unsafe { find_tag(node, (&raw mut search).cast()) }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn find_tag(
    node: *mut pg_sys::Node,
    context: *mut std::ffi::c_void,
) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: node is a valid node; context is the NodeSearch we passed.
    unsafe {
        (*context.cast::<NodeSearch>())
            .tags
            .contains(&(*node).type_)
            || pg_sys::expression_tree_walker(node, Some(find_tag), context)
    }
}

/// True when `node` uses an executor parameter (a subquery's output or a correlated value).
unsafe fn has_exec_param(node: *mut pg_sys::Node) -> bool {
    // SAFETY: node is a valid expression.
    unsafe { has_param(node, |kind| kind != pg_sys::ParamKind::PARAM_EXTERN) }
}

/// True when `node` (subqueries included) has a Param whose kind `wanted` accepts.
pub unsafe fn has_param(
    node: *mut pg_sys::Node,
    wanted: fn(pg_sys::ParamKind::Type) -> bool,
) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walk(
        node: *mut pg_sys::Node,
        context: *mut std::ffi::c_void,
    ) -> bool {
        if node.is_null() {
            return false;
        }
        // SAFETY: node is a valid node; casts follow its tag; context is the predicate.
        unsafe {
            let wanted = *context.cast::<fn(pg_sys::ParamKind::Type) -> bool>();
            match (*node).type_ {
                pg_sys::NodeTag::T_Param => wanted((*node.cast::<pg_sys::Param>()).paramkind),
                pg_sys::NodeTag::T_Query => {
                    pg_sys::query_tree_walker(node.cast(), Some(walk), context, 0)
                }
                _ => pg_sys::expression_tree_walker(node, Some(walk), context),
            }
        }
    }
    let mut wanted = wanted;
    // SAFETY: the walker only reads the tree; the context outlives the walk.
    unsafe { walk(node, (&raw mut wanted).cast()) }
}

type Mutator =
    unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut std::ffi::c_void) -> *mut pg_sys::Node;

/// `f` as the argument-less function pointer type the bindings give expression_tree_mutator.
pub fn as_mutator(f: Mutator) -> unsafe extern "C-unwind" fn() -> *mut pg_sys::Node {
    // SAFETY: the C declaration takes `Node *(*)(Node *, void *)`; only the Rust type of the
    // pointer changes, and PostgreSQL calls it with exactly these two arguments.
    unsafe { std::mem::transmute::<Mutator, unsafe extern "C-unwind" fn() -> *mut pg_sys::Node>(f) }
}

/// A parameter node of the given kind, id and type.
pub unsafe fn new_param(
    kind: pg_sys::ParamKind::Type,
    id: i32,
    type_oid: pg_sys::Oid,
    typmod: i32,
    collation: pg_sys::Oid,
) -> *mut pg_sys::Param {
    // SAFETY: a zeroed node in the current memory context, filled as a Param.
    unsafe {
        let param = pg_sys::palloc0(std::mem::size_of::<pg_sys::Param>()).cast::<pg_sys::Param>();
        (*param).xpr.type_ = pg_sys::NodeTag::T_Param;
        (*param).paramkind = kind;
        (*param).paramid = id;
        (*param).paramtype = type_oid;
        (*param).paramtypmod = typmod;
        (*param).paramcollid = collation;
        (*param).location = -1;
        param
    }
}

/// True when values of `type_oid` under `collation` come back unchanged from a text array
/// literal: the type has an array type, is not an array itself, separates elements with a
/// comma, and the column has the type's own collation.
pub unsafe fn travels_in_array(type_oid: pg_sys::Oid, collation: pg_sys::Oid) -> bool {
    // SAFETY: catalog lookups of an existing type.
    unsafe {
        if pg_sys::get_array_type(type_oid) == pg_sys::InvalidOid
            || pg_sys::get_base_element_type(type_oid) != pg_sys::InvalidOid
            || collation != pg_sys::get_typcollation(type_oid)
        {
            return false;
        }
        let (mut length, mut by_value, mut align, mut delimiter) = (0i16, false, 0i8, 0i8);
        let (mut io_param, mut function) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
        pg_sys::get_type_io_data(
            type_oid,
            pg_sys::IOFuncSelector::IOFunc_input,
            &mut length,
            &mut by_value,
            &mut align,
            &mut delimiter,
            &mut io_param,
            &mut function,
        );
        delimiter as u8 == b','
    }
}
