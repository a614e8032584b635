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
    u32::from(funcid) < pg_sys::FirstNormalObjectId && unsafe { pg_sys::func_volatile(funcid) } == b'i' as std::ffi::c_char
}

fn collation_ok(collation: pg_sys::Oid) -> bool {
    let c = u32::from(collation);
    c == 0 || collation == pg_sys::DEFAULT_COLLATION_OID || c == C_COLLATION_OID || c == POSIX_COLLATION_OID
}

unsafe fn all_shippable(list: *mut pg_sys::List) -> bool {
    // SAFETY: list is a List of expression nodes (or NULL, an empty list).
    unsafe { pgrx::PgList::<pg_sys::Node>::from_pg(list).iter_ptr().all(|n| shippable(n)) }
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
            pg_sys::NodeTag::T_Param => (*node.cast::<pg_sys::Param>()).paramkind == pg_sys::ParamKind::PARAM_EXTERN,
            pg_sys::NodeTag::T_OpExpr | pg_sys::NodeTag::T_DistinctExpr | pg_sys::NodeTag::T_NullIfExpr => {
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
                builtin_immutable((*func).funcid) && collation_ok((*func).inputcollid) && all_shippable((*func).args)
            }
            pg_sys::NodeTag::T_BoolExpr => all_shippable((*node.cast::<pg_sys::BoolExpr>()).args),
            pg_sys::NodeTag::T_NullTest => shippable((*node.cast::<pg_sys::NullTest>()).arg.cast()),
            pg_sys::NodeTag::T_BooleanTest => shippable((*node.cast::<pg_sys::BooleanTest>()).arg.cast()),
            pg_sys::NodeTag::T_RelabelType => shippable((*node.cast::<pg_sys::RelabelType>()).arg.cast()),
            pg_sys::NodeTag::T_ArrayExpr => all_shippable((*node.cast::<pg_sys::ArrayExpr>()).elements),
            _ => false,
        }
    }
}

/// SQL text of `clause` over relation `relid` (column names unqualified).
pub unsafe fn deparse(clause: *mut pg_sys::Node, relid: pg_sys::Oid) -> String {
    // SAFETY: clause is a shippable expression over relid; the result is a palloc'd C string.
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        let context = pg_sys::deparse_context_for(name, relid);
        let text = pg_sys::deparse_expression(clause, context, false, false);
        CStr::from_ptr(text).to_string_lossy().into_owned()
    }
}
