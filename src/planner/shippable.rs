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

fn builtin_immutable(funcid: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup by oid.
    u32::from(funcid) < pg_sys::FirstNormalObjectId
        && unsafe { pg_sys::func_volatile(funcid) } == b'i' as std::ffi::c_char
}

fn collation_ok(collation: pg_sys::Oid) -> bool {
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
                shippable((*node.cast::<pg_sys::RelabelType>()).arg.cast())
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

/// Executor parameters (correlated values, init plans; ids from 0) are written as
/// `$<EXEC_PARAM_BASE + id>`
/// in fragment text, to tell them from the statement's own `$n`.
pub const EXEC_PARAM_BASE: i32 = 100_000;

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
